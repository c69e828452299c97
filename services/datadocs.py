"""A trial's Great Expectations Data Docs: where they are, which of their files may be served, and
their contents (for ``GET /datadocs/<trial>/`` in :mod:`portal.datadocs_views` and the QC flow's link).

Each trial's QC runs through its own file-backed GX project, ``<data dir>/gx/<trial>``
(:func:`gx_project_dir`), so the Data Docs of one trial hold nothing of another and reading them
is decided per trial like every other trial object.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from corelab.settings import Settings
from corelab.validate import UnsafePath, safe_join

DOCS_SITE = ("gx", "uncommitted", "data_docs", "local_site")
"""The Data Docs site inside a GX project (where :func:`expectations.manual.validate` writes it)."""

# Only what GX writes into a docs site; anything else there (a stray file) is not served.
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png",
               ".gif": "image/gif", ".ico": "image/x-icon", ".svg": "image/svg+xml", ".otf": "font/otf",
               ".ttf": "font/ttf", ".woff": "font/woff", ".woff2": "font/woff2"}

MAX_LISTED = 200  # newest validation results on the contents page; a run per received series adds up
_RUN_TIME = re.compile(r"^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})")


def gx_project_dir(settings: Settings, trial_code: str) -> Path:
    """The trial's GX project folder, ``<data dir>/gx-trials/<trial>``; a code that is not one
    plain name raises :class:`corelab.validate.UnsafePath`. Not under ``<data dir>/gx``, the
    project all trials shared before: a trial coded ``gx`` would have served every trial's old docs."""
    return safe_join(settings.data_dir / "gx-trials", trial_code)


def data_docs_site(settings: Settings, trial_code: str) -> Path:
    """The folder of the trial's Data Docs (``index.html`` and the pages it links)."""
    return gx_project_dir(settings, trial_code).joinpath(*DOCS_SITE)


def data_docs_url(settings: Settings, trial_code: str) -> str:
    """The portal URL of the trial's Data Docs contents page (from the settings, never a request)."""
    return f"{settings.public_url}/datadocs/{urllib.parse.quote(trial_code, safe='')}/"


def docs_file(settings: Settings, trial_code: str, path: str) -> Path | None:
    """The file ``path`` names inside the trial's docs folder, or None.

    None for an empty or absolute path, a ``.``/``..``/empty part, a backslash or NUL, a path
    that resolves (symbolic links followed) outside the folder, a type GX does not write, or a
    file that does not exist.
    """
    try:
        site = data_docs_site(settings, trial_code)
        file = safe_join(site, *path.split("/"))
    except UnsafePath:
        return None
    if file.suffix.lower() not in MEDIA_TYPES or not file.is_file():
        return None
    return file


def docs_contents(site: Path) -> dict:
    """The pages of a docs folder: ``validations`` (newest first, at most :data:`MAX_LISTED`),
    ``suites``, and how many validation pages there are in all."""
    def run_time(page: Path) -> str:
        for part in reversed(page.relative_to(site).parts):
            if m := _RUN_TIME.match(part):
                return "{}-{}-{} {}:{}:{} UTC".format(*m.groups())
        return ""

    validations = sorted(site.glob("validations/**/*.html"), key=lambda p: (run_time(p), str(p)), reverse=True)
    suites = sorted(site.glob("expectations/**/*.html"))
    return {"total": len(validations),
            "validations": [{"href": p.relative_to(site).as_posix(), "suite": p.relative_to(site).parts[1],
                             "run_time": run_time(p)} for p in validations[:MAX_LISTED]],
            "suites": [{"href": p.relative_to(site).as_posix(),
                        "name": ".".join(p.relative_to(site).with_suffix("").parts[1:])} for p in suites]}
