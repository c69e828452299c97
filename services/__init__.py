"""The use cases: one function per thing a user or a schedule does.

Each takes a database session (or the settings) and plain values and returns plain data; none
imports Prefect or knows about HTTP. Prefect tasks (``tasks/``), the ``corelab`` command line
(``flows/cli*.py``) and the web portal call these functions, so every entry point takes the same
path through the science and report packages.

    services.intake    register, sites, file drops, quarantine
    services.lookup    read-only listings: series, deviations, accreditation, audit, SUV, phantoms
    services.review    queries to sites, waivers
    services.reports   publish (render + deliver) and sign reports, per-series QC notes, exports
    services.nightly   the nightly steps: series of the day, register, calibration drift, snapshot
"""
