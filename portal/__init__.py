"""The core lab portal: server-rendered pages for sites, physicists, trial managers and admins.

    portal.app          the application factory (routers, static files, security headers)
    portal.security     sessions, CSRF, the user's scope on each request, role checks
    portal.pages        templates and the page helpers every view uses
    portal.auth_views   log in and out (password), and portal.oidc (OpenID Connect)
    portal.site_views   a site's grid of scans, a series' QC result, scanners
    portal.review_views the physicist's worklist, queries, waivers, quarantine
    portal.report_views reports to read, download (audited) and sign (password asked again)
    portal.manager_views the trial manager's deviations, rates, report and exports
    portal.admin_views  users, sites and AE titles; a user's own API tokens
    portal.api_views    the JSON API for machine clients (bearer tokens)

Every view calls the use cases in ``services/``, as the command line does.
"""
