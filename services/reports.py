"""Use cases of reports: publish (render a new version when the content changed, deliver it),
export the trial tables, list and sign.

There is one route to each report: the command line, the Prefect tasks and the portal call the
same function here, so alternating them never makes a new version of an unchanged report.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlmodel import Session, col, select

from corelab.models import Accreditation, Scanner, Series, Site, Subject, Trial
from corelab.settings import Settings
from expectations.manual import trial_fields
from reports.accreditation import accreditation_report
from reports.delivery import deliver_report, publish
from reports.exports import FORMATS, export_trial
from reports.image_figures import series_qc_png
from reports.render import ReportError, report_rows, sign_report
from reports.series_feedback import series_qc_report
from reports.site_qc import month_period, site_qc_report
from reports.trial import trial_deviation_report

log = logging.getLogger(__name__)

TRIAL_EXPORT_FORMATS = ("csv", "parquet")
"""What the trial deviation report links: both formats, each carrying the manual version."""


def export_trial_tables(session: Session, settings: Settings, trial_code: str, *, fmt: str = "parquet",
                        out_dir: Path | None = None) -> dict[str, str]:
    """Write the trial's header table and deviations in ``fmt`` (default folder: the exports)."""
    return export_trial(session, trial_code, out_dir or settings.exports_dir, fmt=fmt,
                        manual_version=trial_fields(trial_code).get("manual_version"))


def publish_trial_report(session: Session, settings: Settings, trial_code: str, *, force: bool = False,
                         reason: str = "", deliver: bool = True, actor: str = "corelab") -> dict:
    """Export the trial's tables (CSV and Parquet, with the manual version), then render and
    deliver its deviation report linking them.

    Unchanged tables keep their files (see :func:`reports.exports.export_trial`), so an unchanged
    trial keeps its newest report version whichever entry point asks.
    """
    if session.exec(select(Trial).where(Trial.code == trial_code)).first() is None:
        raise ReportError(f"no trial {trial_code!r}; load the register first")
    exports = {}
    for fmt in TRIAL_EXPORT_FORMATS:
        paths = export_trial_tables(session, settings, trial_code, fmt=fmt)
        exports.update({f"{name}.{fmt}": p for name, p in paths.items()})
    spec = trial_deviation_report(session, trial_code, exports=exports)
    return publish(session, settings, spec, force=force, reason=reason, deliver=deliver, actor=actor)


def publish_accreditation_report(session: Session, settings: Settings, scanner_code: str, *,
                                 standard: str | None = None, scope: str | None = None, force: bool = False,
                                 reason: str = "", deliver: bool = True, actor: str = "corelab") -> dict:
    """The accreditation report of one scanner (and standard, scope)."""
    spec = accreditation_report(session, scanner_code, settings=settings, standard=standard, scope=scope)
    return publish(session, settings, spec, force=force, reason=reason, deliver=deliver, actor=actor)


def publish_trial_accreditation_reports(session: Session, settings: Settings, trial_code: str) -> list[dict]:
    """One accreditation report per scanner accreditation in the trial's scope."""
    rows = session.exec(select(Scanner.code, Accreditation.standard).join(
        Accreditation, Accreditation.scanner_id == Scanner.id).where(Accreditation.scope == trial_code)
        .order_by(col(Scanner.code))).all()
    return [publish_accreditation_report(session, settings, code, standard=standard, scope=trial_code)
            for code, standard in rows]


def publish_site_qc_report(session: Session, settings: Settings, site_code: str, *, month: str | None = None,
                           force: bool = False, reason: str = "", deliver: bool = True,
                           actor: str = "corelab") -> dict:
    """The site QC report of one site for a month (YYYY-MM; default this month)."""
    since, until, label = month_period(month)
    spec = site_qc_report(session, site_code, since=since, until=until, label=label)
    return publish(session, settings, spec, force=force, reason=reason, deliver=deliver, actor=actor)


def trial_site_codes(session: Session, trial_code: str) -> list[str]:
    """Codes of the sites with a subject in the trial, sorted."""
    trial = session.exec(select(Trial).where(Trial.code == trial_code)).one()
    site_ids = set(session.exec(select(Subject.site_id).where(Subject.trial_id == trial.id)))
    return [s.code for s in session.exec(select(Site).where(col(Site.id).in_(site_ids)).order_by(col(Site.code)))]


def publish_trial_site_qc_reports(session: Session, settings: Settings, trial_code: str, *,
                                  month: str | None = None) -> list[dict]:
    """The site QC report of the month for every site of the trial."""
    return [publish_site_qc_report(session, settings, code, month=month)
            for code in trial_site_codes(session, trial_code)]


def list_reports(session: Session) -> list[dict]:
    return report_rows(session)


def sign_and_deliver(session: Session, settings: Settings, report_ref: str, *, signer: str, reason: str,
                     deliver: bool = True, login: str | None = None) -> dict:
    """E-sign a report version (audit event; the report is frozen) and deliver its signature file.

    ``signer`` is the printed name, ``login`` the account that signs (see :func:`reports.render.sign_report`).
    """
    report = sign_report(session, report_ref, signer=signer, reason=reason, data_dir=settings.data_dir, login=login)
    data = {"report": report.id, "path": report.path, "sha256": report.sha256, "signed_by": report.signed_by,
            "signed_at": report.signed_at.isoformat()}
    if deliver:  # the site gets the signature file beside the report
        data["delivery"] = deliver_report(session, settings, report, actor=login or signer)
    return data


def series_figure(suv, grid, image_qc) -> bytes:
    """The QC note's figure (coronal MIP and three planes with the liver VOI) of an analysed
    series, as PNG bytes; drawn while the volume is in memory (the ``on_image`` hook of
    :func:`expectations.qc.qc_series_batch`)."""
    liver = image_qc.liver
    label = f"liver SUVmean {liver.suv_mean:.2f}" if liver.assessable and liver.suv_mean is not None else \
        "liver VOI not assessable"
    return series_qc_png(suv, grid, centre_mm=liver.centre_mm if liver.assessable else None,
                         radius_mm=liver.radius_mm, label=label)


def figure_collector() -> tuple[dict[int, bytes], object]:
    """``(figures, on_image)``: pass ``on_image`` to the QC; ``figures[series_id]`` then holds
    each analysed series' note figure (PNG bytes, not the volume: a batch stays small)."""
    figures: dict[int, bytes] = {}

    def on_image(series, suv, grid, image_qc) -> None:
        figures[series.id] = series_figure(suv, grid, image_qc)

    return figures, on_image


def _figure_from_files(session: Session, settings: Settings, series: Series) -> bytes | None:
    """The note figure of a judged series, from its files (when the QC's figure is not at hand)."""
    from expectations.qc import image_columns, series_headers

    figures, on_image = figure_collector()
    image_columns(session, settings, series, series.header_row, series_headers(session, settings, series)[0],
                  on_image=on_image)
    return figures.get(series.id)


def publish_series_feedback(session: Session, settings: Settings, series_id: int, *,
                            figure_png: bytes | None = None, deliver: bool = True, actor: str = "qc") -> dict:
    """Render the QC note of one judged trial PET series and deliver it to its site.

    Called right after the series' QC (:func:`publish_feedback_after_qc`); the site gets it in
    its outbox, by e-mail when configured, and in the portal. An unchanged note makes no new
    version and is not delivered again. ``figure_png`` is the figure drawn at QC time; without
    it, the figure is drawn again from the series' files (same input, same picture).
    """
    series = session.get(Series, series_id)
    if series is None:
        raise ReportError(f"no series {series_id}")
    if figure_png is None and (series.header_row or {}).get("liver_assessable") is not None:
        figure_png = _figure_from_files(session, settings, series)
    spec = series_qc_report(session, series_id, figure_png=figure_png)
    return publish(session, settings, spec, deliver=deliver, actor=actor)


def publish_feedback_after_qc(settings: Settings, series_ids: list[int], figures: dict[int, bytes], *,
                              actor: str = "qc") -> dict:
    """After a QC batch committed: the QC note of each judged trial PET series, one transaction
    each. A note that fails is logged and counted; it never undoes the QC (the deviations stand)."""
    from corelab.db import session_scope

    out: dict = {"rendered": 0, "unchanged": 0, "failed": []}
    for series_id in series_ids:
        try:
            with session_scope(settings) as session:
                series = session.get(Series, series_id)
                if series is None or series.qc_state != "done" or series.modality != "PT" or series.kind != "trial":
                    continue
                result = publish_series_feedback(session, settings, series_id, figure_png=figures.get(series_id),
                                                 actor=actor)
            out[result["status"]] += 1
        except Exception as exc:  # noqa: BLE001 - one note must not stop the others
            log.exception("QC note of series %s failed", series_id)
            out["failed"].append({"series_id": series_id, "error": f"{type(exc).__name__}: {exc}"})
    return out


__all__ = ["FORMATS", "export_trial_tables", "publish_trial_report", "publish_accreditation_report",
           "publish_trial_accreditation_reports", "publish_site_qc_report", "publish_trial_site_qc_reports",
           "trial_site_codes", "list_reports", "sign_and_deliver", "series_figure", "figure_collector",
           "publish_series_feedback", "publish_feedback_after_qc"]
