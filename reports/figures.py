"""Figures for reports: drawn on an Axes passed in, saved as embedded PNG."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # reports are rendered headless
import matplotlib.pyplot as plt  # noqa: E402


def deviations_per_site(ax, counts: dict[str, dict[str, int]]) -> None:
    """Stacked bars of major and minor deviations per site; ``counts[site] = {major, minor}``."""
    sites = sorted(counts)
    major = [counts[s].get("major", 0) for s in sites]
    minor = [counts[s].get("minor", 0) for s in sites]
    ax.bar(sites, major, color="#c0392b", label="major")
    ax.bar(sites, minor, bottom=major, color="#f39c12", label="minor")
    ax.set_xlabel("site")
    ax.set_ylabel("deviations")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def png_data_uri(fig) -> str:
    """The figure as a data: URI, so the HTML stays a single self-contained file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def calibration_chart(ax, drift) -> None:
    """Control chart of a scanner's calibration bias (%) over time with its limits.

    ``drift`` is an :class:`accreditation.drift.DriftResult`.
    """
    dates = [d for d, _ in drift.points]
    biases = [b for _, b in drift.points]
    lim = drift.limits
    ax.axhspan(-lim.warning_pct, lim.warning_pct, color="#d5f5e3", zorder=0)
    for y, style in ((lim.action_pct, "-"), (-lim.action_pct, "-"), (lim.warning_pct, ":"), (-lim.warning_pct, ":")):
        ax.axhline(y, color="#c0392b" if style == "-" else "#b9770e", linestyle=style, linewidth=1)
    if drift.statistical_limits_pct:
        for y in drift.statistical_limits_pct:
            ax.axhline(y, color="#555", linestyle="--", linewidth=0.8)
    colours = {"ok": "#1e8449", "warning": "#b9770e", "action": "#c0392b"}
    ax.plot(dates, biases, "-", color="#888", linewidth=0.8)
    ax.scatter(dates, biases, color=[colours["ok"]] * (len(biases) - 1) + [colours[drift.level]], zorder=3)
    ax.set_ylabel("SUV bias (%)")
    ax.set_title(f"{drift.scanner}: calibration QC ({drift.level})", fontsize=10)
    ax.set_ylim(min(-lim.action_pct * 1.3, min(biases, default=0) - 2), max(lim.action_pct * 1.3, max(biases, default=0) + 2))
    ax.spines[["top", "right"]].set_visible(False)
    ax.figure.autofmt_xdate()


def calibration_chart_png(drift) -> bytes:
    """The calibration control chart of one scanner as PNG bytes (same data, same bytes)."""
    fig, ax = plt.subplots(figsize=(5, 2.6))
    calibration_chart(ax, drift)
    return base64.b64decode(png_data_uri(fig).split(",", 1)[1])
