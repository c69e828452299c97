"""Scanner accreditation flow: phantom series -> analysis -> verdict -> register."""

from __future__ import annotations

import base64
import math
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.alerts import HOOKS
from flows.runners import task_runner
from tasks.phantoms import accredit_phantom, coming_expiries, find_phantom_series, with_scanner_codes

_METRIC_NAMES = {"rc_mean": "RCmean (A50)", "rc_max": "RCmax", "rc_peak": "RCpeak (1 mL)"}


@flow(name="accredit-scanners", flow_run_name="accredit {scope} ({standard})", log_prints=True,
      task_runner=task_runner(), **HOOKS)
def accredit_scanners(scope: str, standard: str = "EARL1", series: list[tuple] | None = None,
                      warn_days: int = 30) -> list[dict]:
    """Analyse received phantom series (all pending ones by default) and update the register.

    ``series`` items are ``(series id, series UID)`` or ``(series id, series UID, scanner code)``.
    The default selection (:func:`tasks.phantoms.find_phantom_series`) leaves out a series that
    failed for want of its fill sheet and still has none: the run that found it so failed and
    alerted once, the worklist shows it, and its sheet puts it back; ``series`` still takes it.
    The run ends Failed (:class:`AccreditationIncomplete`, raised after the artifacts are written)
    when any series could not be analysed (no fill sheet, unreadable, an analysis error); a
    withheld verdict (localisation uncertain) is an outcome, not a failure.
    Leaves two artifacts: the results with their RC tables against the standard's bands and,
    per NEMA IEC phantom, the sphere-assignment figure (the axial plane with each sphere's name at
    its fitted centre; a withheld verdict says why) (``accreditation-<scope>``), and the
    accreditations expiring within ``warn_days`` (``accreditation-expiries``).
    """
    todo = series if series is not None else find_phantom_series()
    if any(len(item) < 3 or not item[2] for item in todo):
        todo = with_scanner_codes(todo, len(todo))
    futures = [accredit_phantom.submit(sid, uid, standard, scope, code) for sid, uid, code in todo]
    results = [_outcome(f, item) for f, item in zip(futures, todo)]
    if results:
        create_markdown_artifact(key=f"accreditation-{scope.lower()}", markdown=_markdown(results, standard),
                                 description=f"Phantom results and verdicts ({standard})")
    expiring = coming_expiries(warn_days)
    create_markdown_artifact(key="accreditation-expiries", markdown=_expiries_markdown(expiring, warn_days),
                             description=f"Accreditations expiring within {warn_days} days")
    not_done = [r for r in results if r.get("verdict") == "error"]
    if not_done:
        # After the artifacts: the run ends Failed, so the failure hooks record the alert and the
        # run list shows that the job was not done. A withheld verdict is an answer, not a failure.
        raise AccreditationIncomplete(results, not_done)
    return results


class AccreditationIncomplete(RuntimeError):
    """Some phantom series of an ``accredit-scanners`` run could not be analysed.

    The message names each series (UID tail and scanner) with its error and the fix; ``results``
    holds every series' result of the run (the analysed ones included), as the flow would return.
    """

    def __init__(self, results: list[dict], not_done: list[dict]):
        self.results = results
        self.not_done = not_done
        lines = "; ".join(f"{r['series_uid'][-12:]} ({r.get('scanner') or 'unknown scanner'}): {r.get('error', '')}"
                          for r in not_done)
        super().__init__(f"{len(not_done)} of {len(results)} phantom series could not be analysed: {lines}")


def _outcome(future, item: tuple) -> dict:
    """The task's result, or an error row when it raised even after its retry (the run goes on to
    its artifacts and then fails, naming the series)."""
    value = future.result(raise_on_failure=False)
    if not isinstance(value, BaseException):
        return value
    sid, uid, code = item
    return {"series_uid": uid, "scanner": code, "verdict": "error",
            "error": f"the analysis failed ({type(value).__name__}: {str(value)[:300]}); the task run's log has "
                     "the traceback; fix the cause and run accredit-scanners again"}


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _rc_table(r: dict) -> list[str]:
    """Per sphere and metric: value, band, margin, verdict (from the stored checks; none when withheld)."""
    checks = (r.get("checks") or {}).get("checks") or []
    spheres = (r.get("metrics") or {}).get("spheres") or []
    by_key = {(c["metric"], c["diameter_mm"]): c for c in checks}
    metrics = [m for m in _METRIC_NAMES if any(c["metric"] == m for c in checks)] or ["rc_mean", "rc_max"]
    head = "| sphere mm | " + " | ".join(f"{_METRIC_NAMES[m]} [band] margin" for m in metrics) + \
           " | % contrast | bkg var % |"
    lines = [head, "|---" * (len(metrics) + 3) + "|"]
    for s in spheres:
        cells = []
        for m in metrics:
            c = by_key.get((m, s["diameter_mm"]))
            if c is None:
                cells.append(_fmt(s.get(m)))
                continue
            mark = ("ok" if c["passed"] else "**FAIL**") if not r.get("withheld") else "not judged"
            note = "" if c["verified"] else " (unverified)"
            cells.append(f"{_fmt(c['value'])} [{c['low']:.2f}-{c['high']:.2f}] {_fmt(c['margin'], '+.3f')} "
                         f"{mark}{note}")
        nema = f"{_fmt(s.get('percent_contrast'), '.1f')} | {_fmt(s.get('background_variability_pct'), '.2f')}"
        lines.append(f"| {s['diameter_mm']:g} | " + " | ".join(cells) + f" | {nema} |")
    return lines


def _verdict_cell(r: dict) -> str:
    w = r.get("withheld")
    return f"**withheld: {w.get('reason', 'localisation uncertain')}**" if w else f"**{r['verdict']}**"


def _figure_markdown(r: dict) -> list[str]:
    """The sphere-assignment PNG embedded as a data: URI (both Prefect UIs show data:image in markdown)."""
    path = Path(r["figure"]) if r.get("figure") else None
    if path is None or not path.is_file():
        return []
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return ["", f"![sphere assignment of {r.get('scanner') or ''}: each label at its fitted centre]({uri})", "",
            "*Axial plane through the sphere centres; each label is the diameter (mm) the analysis gave the sphere "
            "found there, at its fitted centre; beneath it the volume measured there / the nominal volume.*"]


def _markdown(results: list[dict], standard: str) -> str:
    lines = [f"# Phantom analysis against {standard}", "",
             "| scanner | series | kind | verdict | register | valid until | key figures |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.get("metrics") or {}
        if r.get("kind") == "nema_iec":
            key = f"lung residual {_fmt(m.get('lung_residual'), '.1f')} %"
        elif r.get("kind") == "uniform_cylinder":
            key = (f"SUV bias {_fmt(m.get('calibration_bias_pct'), '+.1f')} %, SUV mean {_fmt(m.get('suv_mean'))}, "
                   f"CoV {_fmt(m.get('cov_pct'), '.1f')} %")
        else:
            key = r.get("error", "")
        lines.append(f"| {r.get('scanner') or ''} | {r['series_uid'][-12:]} | {r.get('kind', '')} | "
                     f"{_verdict_cell(r)} | {r.get('accreditation') or ''} | {r.get('valid_until') or ''} | {key} |")
    for r in results:
        if r.get("kind") != "nema_iec":
            continue
        m = r.get("metrics") or {}
        lines += ["", f"## {r.get('scanner') or ''} NEMA IEC ({r['series_uid'][-12:]}): {_verdict_cell(r)}", ""]
        w = r.get("withheld")
        if w:
            lines += [f"> **Withheld: {w.get('reason', 'localisation uncertain')}.** Neither pass nor fail; the "
                      "register is unchanged by this result. The RC values below may belong to other spheres.", ">"]
            lines += [f"> - {d}" for d in w.get("details") or []]
            lines += [">", f"> To do: {w.get('action', '')}", ""]
        lines += [f"RCpeak placement: {m.get('rc_peak_placement', '')}; localisation: {m.get('localisation', '')}; "
                  "margins are the distance to the nearer band edge (negative outside); unverified bands are shown "
                  "but do not decide the verdict.", ""]
        lines += _rc_table(r)
        lines += _figure_markdown(r)
    return "\n".join(lines)


def _expiries_markdown(expiring: list[dict], warn_days: int) -> str:
    lines = [f"# Accreditations expiring within {warn_days} days", ""]
    if not expiring:
        return "\n".join(lines + ["None."])
    lines += ["| scanner | site | standard | scope | status | valid until | days left | due |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {e['scanner']} | {e['site']} | {e['standard']} | {e['scope']} | {e['status']} | "
              f"{e['valid_until']} | {e['days_left']} | {e['due']} |" for e in expiring]
    return "\n".join(lines)
