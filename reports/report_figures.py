"""Figures of the accreditation and site QC reports, each drawn on Axes passed in.

The functions take the saved result values (the report's JSON) and, for the phantom images,
the image volume; they draw and return nothing. :func:`reports.figures.png_data_uri` turns a
finished figure into an embeddable PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # reports are rendered headless
import matplotlib.patheffects as path_effects  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402

PASS_COLOUR, FAIL_COLOUR, BAND_COLOUR, LINE_COLOUR = "#1e8449", "#c0392b", "#cfe8d8", "#1f3b5a"
WITHHELD_COLOUR = "#b9770e"
METRIC_LABELS = {"rc_mean": "RCmean (A50)", "rc_max": "RCmax", "rc_peak": "RCpeak (1 mL)"}

__all__ = ["recovery_curve", "axial_profile", "phantom_planes", "sphere_assignment", "deviations_by_rule_bars",
           "METRIC_LABELS"]


def _tidy(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)


def recovery_curve(ax, spheres: Sequence[Mapping], checks: Sequence[Mapping], metric: str) -> None:
    """Recovery coefficient against sphere diameter, with the standard's band shaded.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    spheres : sequence of mapping
        Per sphere ``diameter_mm`` and the metric's value (the saved NEMA IEC result).
    checks : sequence of mapping
        The verdict's checks (``metric``, ``diameter_mm``, ``low``, ``high``, ``passed``,
        ``verified``); spheres of the metric without a check are drawn without a band.
    metric : str
        ``rc_mean``, ``rc_max`` or ``rc_peak``.
    """
    band = sorted((c["diameter_mm"], c["low"], c["high"], c["verified"]) for c in checks if c["metric"] == metric)
    if band:
        d, low, high, verified = zip(*band)
        ax.fill_between(d, low, high, color=BAND_COLOUR if all(verified) else "#e5e5e5", step=None,
                        label="band" if all(verified) else "band (unverified)", zorder=0)
        ax.plot(d, low, color="#7fb28f", linewidth=0.8)
        ax.plot(d, high, color="#7fb28f", linewidth=0.8)
    passed = {c["diameter_mm"]: c["passed"] for c in checks if c["metric"] == metric}
    pts = [(s["diameter_mm"], s.get(metric)) for s in spheres if s.get(metric) is not None]
    if pts:
        x, y = zip(*pts)
        ax.plot(x, y, "-", color=LINE_COLOUR, linewidth=1.2, zorder=2)
        colours = [PASS_COLOUR if passed.get(d, True) else FAIL_COLOUR for d in x]
        ax.scatter(x, y, c=colours, s=22, zorder=3, edgecolors="white", linewidths=0.5)
    ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
    ax.set_xlabel("sphere diameter (mm)", fontsize=8)
    ax.set_ylabel("recovery coefficient", fontsize=8)
    ax.set_xticks([10, 13, 17, 22, 28, 37])
    ax.set_ylim(0, max(1.4, max((p[1] for p in pts), default=0) * 1.1, max((b[2] for b in band), default=0) * 1.05))
    ax.grid(axis="y", color="#eee", linewidth=0.6)
    _tidy(ax)


def axial_profile(ax, z_mm: Sequence[float], means_kbq_ml: Sequence[float], true_kbq_ml: float,
                  *, band_pct: tuple[float, float] | None = None) -> None:
    """The uniform cylinder's axial profile: VOI mean per plane against the true concentration.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    z_mm, means_kbq_ml : sequence of float
        Plane position (mm) and mean of the central VOI on that plane (kBq/mL).
    true_kbq_ml : float
        Filled concentration, decay-corrected to the scan time.
    band_pct : (low, high), optional
        The standard's SUV-bias band, shaded about the true concentration for reference.
    """
    if band_pct is not None:
        ax.axhspan(true_kbq_ml * (1 + band_pct[0] / 100), true_kbq_ml * (1 + band_pct[1] / 100), color=BAND_COLOUR,
                   zorder=0, label=f"bias band {band_pct[0]:+g} to {band_pct[1]:+g} %")
    ax.axhline(true_kbq_ml, color="#555", linestyle="--", linewidth=0.9, label="true concentration")
    ax.plot(z_mm, means_kbq_ml, "o-", color=LINE_COLOUR, markersize=2.5, linewidth=1, label="VOI mean per plane")
    ax.set_xlabel("axial position z (mm)", fontsize=8)
    ax.set_ylabel("activity concentration (kBq/mL)", fontsize=8)
    lo = min(min(means_kbq_ml, default=true_kbq_ml), true_kbq_ml * (1 + (band_pct or (-10, 10))[0] / 100))
    hi = max(max(means_kbq_ml, default=true_kbq_ml), true_kbq_ml * (1 + (band_pct or (-10, 10))[1] / 100))
    pad = 0.15 * (hi - lo or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    ax.legend(fontsize=7, frameon=False, loc="lower center", ncols=3)
    ax.grid(axis="y", color="#eee", linewidth=0.6)
    _tidy(ax)


def phantom_planes(axes: Sequence, array: np.ndarray, voxel_mm: Sequence[float], origin_mm: Sequence[float],
                   through_mm: Sequence[float], vois: Sequence[Mapping]) -> None:
    """The phantom image in three planes (axial, coronal, sagittal) with the VOIs outlined.

    Parameters
    ----------
    axes : sequence of three matplotlib.axes.Axes
    array : ndarray of shape (planes, rows, cols)
        The image (any unit), axis-aligned: planes along z, rows along y, columns along x.
    voxel_mm : (dz, dy, dx)
    origin_mm : (x, y, z)
        Patient position of voxel ``[0, 0, 0]`` (mm).
    through_mm : (x, y, z)
        The point the three planes pass through.
    vois : sequence of mapping
        ``{"shape": "sphere", "centre_mm": (x, y, z), "radius_mm", "label", "passed"}`` or
        ``{"shape": "cylinder", "centre_mm", "radius_mm", "length_mm", "label", "passed"}``
        (axis along z); an optional ``colour`` overrides the pass/fail colour.
    """
    dz, dy, dx = (float(v) for v in voxel_mm)
    ox, oy, oz = (float(v) for v in origin_mm)
    nz, ny, nx = array.shape
    tx, ty, tz = (float(v) for v in through_mm)
    k = int(np.clip(round((tz - oz) / dz), 0, nz - 1))
    j = int(np.clip(round((ty - oy) / dy), 0, ny - 1))
    i = int(np.clip(round((tx - ox) / dx), 0, nx - 1))
    xs = (ox - dx / 2, ox + (nx - 0.5) * dx)
    ys = (oy - dy / 2, oy + (ny - 0.5) * dy)
    zs = (oz - dz / 2, oz + (nz - 0.5) * dz)
    vmax = 1.6 * float(np.percentile(array, 99.9)) or 1.0  # grey, so the VOI outlines show
    style = dict(cmap="Greys", vmin=0, vmax=vmax, interpolation="nearest")
    planes = [  # (image, extent, origin, plane position, (horizontal, vertical, normal) axis indices)
        (array[k], (xs[0], xs[1], ys[1], ys[0]), "upper", oz + k * dz, (0, 1, 2), f"axial z = {oz + k * dz:.0f} mm"),
        (array[:, j, :], (xs[0], xs[1], zs[0], zs[1]), "lower", oy + j * dy, (0, 2, 1),
         f"coronal y = {oy + j * dy:.0f} mm"),
        (array[:, :, i], (ys[0], ys[1], zs[0], zs[1]), "lower", ox + i * dx, (1, 2, 0),
         f"sagittal x = {ox + i * dx:.0f} mm"),
    ]
    for ax, (img, extent, origin, pos, (h, v, n), title) in zip(axes, planes):
        ax.imshow(img, extent=extent, origin=origin, aspect="equal", **style)
        for voi in vois:
            c = [float(t) for t in voi["centre_mm"]]
            colour = voi.get("colour") or (PASS_COLOUR if voi.get("passed", True) else FAIL_COLOUR)
            if voi["shape"] == "sphere":
                d = abs(c[n] - pos)
                if d >= voi["radius_mm"]:
                    continue
                r = math.sqrt(voi["radius_mm"] ** 2 - d ** 2)
                ax.add_patch(Circle((c[h], c[v]), r, fill=False, edgecolor=colour, linewidth=1.1))
                if n == 2 and voi.get("label"):
                    ax.annotate(voi["label"], (c[h], c[v] - voi["radius_mm"] - 2), color=colour, fontsize=6,
                                ha="center", va="bottom")
            else:  # cylinder along z
                if n == 2:
                    if abs(c[2] - pos) <= voi["length_mm"] / 2:
                        ax.add_patch(Circle((c[0], c[1]), voi["radius_mm"], fill=False, edgecolor=colour,
                                            linewidth=1.0))
                else:
                    d = abs(c[n] - pos)
                    if d < voi["radius_mm"]:
                        half = math.sqrt(voi["radius_mm"] ** 2 - d ** 2)
                        ax.add_patch(Rectangle((c[h] - half, c[2] - voi["length_mm"] / 2), 2 * half,
                                               voi["length_mm"], fill=False, edgecolor=colour, linewidth=1.0))
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("mm", fontsize=6)


def sphere_assignment(ax, image: np.ndarray, origin_mm: Sequence[float], pixel_mm: Sequence[float], z_mm: float,
                      spheres: Sequence[Mapping], *, ring_centre_mm: Sequence[float] | None = None,
                      withheld: str | None = None) -> None:
    """The axial plane through the sphere centres, each sphere's name drawn at its fitted centre.

    So a physicist sees at a glance which blob the analysis called which sphere: the label is the
    nominal diameter (mm) the analysis gave the sphere found there, the circle that sphere's
    nominal size, and beneath the label the volume measured there against the nominal volume.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    image : ndarray of shape (rows, cols)
        The plane (any unit); rows along +y, columns along +x.
    origin_mm : (x, y)
        Patient position of the centre of pixel ``[0, 0]``.
    pixel_mm : (row spacing, column spacing)
    z_mm : float
        Patient z of the plane (a sphere whose centre is off the plane by more than its radius
        is drawn dashed, at its nominal size).
    spheres : sequence of mapping
        ``diameter_mm``, ``centre_mm`` (x, y, z), optional ``measured_volume_ml``,
        ``nominal_volume_ml`` and ``passed`` (False: red outline; None: neutral).
    ring_centre_mm : (x, y, z), optional
        The lung-insert axis, marked with a cross.
    withheld : str, optional
        The verdict is withheld: the title says so (in amber) with this reason.
    """
    dy, dx = (float(v) for v in pixel_mm)
    ox, oy = (float(v) for v in origin_mm[:2])
    rows, cols = image.shape
    extent = (ox - dx / 2, ox + (cols - 0.5) * dx, oy + (rows - 0.5) * dy, oy - dy / 2)
    placed = [s for s in spheres if s.get("centre_mm")]
    vmax = float(np.percentile(image, 99.9)) * 1.1 or 1.0
    ax.imshow(image, extent=extent, origin="upper", cmap="Greys", vmin=0, vmax=vmax, interpolation="nearest",
              aspect="equal")
    outline = [path_effects.withStroke(linewidth=2.6, foreground="white")]
    for s in placed:
        x, y, z = (float(v) for v in s["centre_mm"])
        r = float(s["diameter_mm"]) / 2
        colour = (WITHHELD_COLOUR if withheld else FAIL_COLOUR if s.get("passed") is False
                  else PASS_COLOUR if s.get("passed") else LINE_COLOUR)
        off = abs(z - z_mm)
        ax.add_patch(Circle((x, y), math.sqrt(r * r - off * off) if off < r else r, fill=False, edgecolor=colour,
                            linewidth=1.3, linestyle="-" if off < r else "--"))
        ax.annotate(f"{float(s['diameter_mm']):g}", (x, y), ha="center", va="center", fontsize=11,
                    fontweight="bold", color=colour, path_effects=outline)
        measured, nominal = s.get("measured_volume_ml"), s.get("nominal_volume_ml")
        if measured is not None:
            text = f"{measured:.2f} mL" if nominal is None else f"{measured:.2f} / {nominal:.2f} mL"
            ax.annotate(text, (x, y + max(r, 6.0) + 3.0), ha="center", va="top", fontsize=7, color=colour,
                        path_effects=outline)
    if ring_centre_mm is not None:
        ax.plot([float(ring_centre_mm[0])], [float(ring_centre_mm[1])], marker="+", markersize=9, color=LINE_COLOUR,
                markeredgewidth=1.2)
    if placed:  # the ring and a margin for the labels: spheres large enough to read
        xs = [float(s["centre_mm"][0]) for s in placed]
        ys = [float(s["centre_mm"][1]) for s in placed]
        cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2 + 35.0
        ax.set_xlim(cx - half, cx + half)
        ax.set_ylim(cy + half, cy - half)  # y down, as the image is shown
    title = f"axial z = {z_mm:.0f} mm: sphere names at the fitted centres"
    if withheld:
        ax.set_title(f"WITHHELD: {withheld}\n{title}", fontsize=8, color=WITHHELD_COLOUR)
    else:
        ax.set_title(title, fontsize=8)
    ax.set_xlabel("x (mm)", fontsize=7)
    ax.set_ylabel("y (mm)", fontsize=7)
    ax.tick_params(labelsize=6)


def deviations_by_rule_bars(ax, groups: Sequence[Mapping]) -> None:
    """Horizontal bars of deviations per rule, split into active (open, queried) and closed.

    ``groups`` are the rows of :func:`corelab.qcstats.deviations_by_rule`.
    """
    groups = list(groups)[::-1]
    names = [g["rule_id"] for g in groups]
    active = [g["open"] + g["queried"] for g in groups]
    closed = [g["resolved"] + g["waived"] for g in groups]
    colours = [FAIL_COLOUR if g["severity"] == "major" else "#f39c12" for g in groups]
    ax.barh(names, active, color=colours, label="open or queried")
    ax.barh(names, closed, left=active, color="#bbb", label="resolved or waived")
    ax.set_xlabel("deviations", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, frameon=False, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2)
    _tidy(ax)
