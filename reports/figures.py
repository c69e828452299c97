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
