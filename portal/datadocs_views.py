"""A trial's Great Expectations Data Docs, served to the physicists and the trial's managers.

Each trial has its own Data Docs (:mod:`services.datadocs`), so reading them is decided per
trial like every other trial object (:meth:`services.access.Scope.sees_trial`).

``GET /datadocs/<trial>/`` is a contents page of the trial's Data Docs (validation results
newest first, the expectation suites); ``GET /datadocs/<trial>/<file>`` serves one static file
of the docs folder. GX's own ``index.html`` builds its tables with jQuery and bootstrap-table
from public CDNs: the portal allows no remote host and no script, so those tables stay empty
and the contents page takes their place. The validation and suite pages are plain HTML and
read well without their CDN style sheets (the docs' own CSS and fonts are served).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse
from sqlmodel import select

from corelab.models import Trial
from corelab.validate import UnsafePath
from portal.pages import TEMPLATES, not_found
from portal.security import Ctx, require
from services.datadocs import MEDIA_TYPES, data_docs_site, docs_contents, docs_file

router = APIRouter()

READERS = ("physicist", "trial-manager")  # a site sees its own series' QC, not the whole trial's rule runs

# The docs' own style sheets, inline style attributes, images and fonts from this portal; no script
# (GX's inline scripts need jQuery from a CDN) and no remote host; not framable, no form posts.
DATA_DOCS_CSP = ("default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; "
                 "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

CONTENTS = """{% extends "base.html" %}
{% block title %}Data Docs {{ trial }}{% endblock %}
{% block content %}
<h1>Data Docs of {{ trial }}</h1>
<p class="muted">Great Expectations' record of each QC run of this trial against its imaging manual.
{% if scope.reviews %}Files on the server: <code>{{ folder }}</code>.{% endif %}</p>
{% if not docs.total and not docs.suites %}
<p class="card">No QC run has written Data Docs for this trial yet.</p>
{% else %}
<h2>Validation results ({{ docs.total }}{% if docs.total > docs.validations|length %}, newest
{{ docs.validations|length }} shown{% endif %})</h2>
<table><thead><tr><th>run time</th><th>expectation suite</th></tr></thead><tbody>
{% for v in docs.validations %}<tr><td><a href="{{ v.href }}">{{ v.run_time or v.href }}</a></td><td>{{ v.suite }}</td></tr>
{% endfor %}</tbody></table>
<h2>Expectation suites</h2>
<ul>{% for s in docs.suites %}<li><a href="{{ s.href }}">{{ s.name }}</a></li>{% endfor %}</ul>
{% endif %}
{% endblock %}
"""


def _check_trial(ctx: Ctx, trial: str) -> None:
    """404 for a trial that does not exist or that the user does not read (the same answer)."""
    if not ctx.scope.sees_trial(trial):
        raise not_found("trial")
    with ctx.db() as s:
        if s.exec(select(Trial.id).where(Trial.code == trial)).first() is None:
            raise not_found("trial")


@router.get("/datadocs/{trial}/{path:path}")
def data_docs(request: Request, trial: str, path: str, ctx: Ctx = Depends(require(*READERS))):
    _check_trial(ctx, trial)
    if path == "":
        try:
            site = data_docs_site(ctx.settings, trial)
        except UnsafePath:
            raise not_found("trial") from None
        docs = docs_contents(site) if site.is_dir() else {"total": 0, "validations": [], "suites": []}
        html = TEMPLATES.env.from_string(CONTENTS).render(
            request=request, ctx=ctx, scope=ctx.scope, csrf_token=ctx.csrf_token, flash="", trial=trial,
            folder=str(site.resolve()), docs=docs)
        return HTMLResponse(html)
    file = docs_file(ctx.settings, trial, path)
    if file is None:
        raise not_found("file")
    return FileResponse(file, media_type=MEDIA_TYPES[file.suffix.lower()],
                        headers={"Content-Security-Policy": DATA_DOCS_CSP})
