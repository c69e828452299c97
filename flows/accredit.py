"""Scanner accreditation flow: phantom series -> analysis -> verdict -> register."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.phantoms import accredit_phantom, find_phantom_series


@flow(name="accredit-scanners", flow_run_name="accredit {scope} ({standard})", log_prints=True)
def accredit_scanners(scope: str, standard: str = "EARL1", series: list[tuple[int, str]] | None = None) -> list[dict]:
    """Analyse received phantom series (all pending ones by default) and update the register."""
    todo = series if series is not None else find_phantom_series()
    futures = [accredit_phantom.submit(sid, uid, standard, scope) for sid, uid in todo]
    results = [f.result() for f in futures]
    if results:
        create_markdown_artifact(key=f"accreditation-{scope.lower()}", markdown=_markdown(results, standard),
                                 description=f"Phantom results and verdicts ({standard})")
    return results


def _markdown(results: list[dict], standard: str) -> str:
    lines = [f"# Phantom analysis against {standard}", "",
             "| series | kind | verdict | register | key figures |", "|---|---|---|---|---|"]
    for r in results:
        m = r.get("metrics") or {}
        if r.get("kind") == "nema_iec":
            key = ", ".join(f"{s['diameter_mm']:g} mm RCmean {s['rc_mean']:.2f}" for s in m.get("spheres", []))
        elif r.get("kind") == "uniform_cylinder":
            key = f"SUV bias {m.get('calibration_bias_pct', float('nan')):+.1f} %"
        else:
            key = r.get("error", "")
        lines.append(f"| {r['series_uid'][-12:]} | {r.get('kind', '')} | **{r['verdict']}** | "
                     f"{r.get('accreditation') or ''} | {key} |")
    return "\n".join(lines)
