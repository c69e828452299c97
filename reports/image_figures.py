"""Figures of a trial PET series for its per-series QC note, drawn on Axes passed in.

:func:`liver_voi_views` draws the coronal maximum-intensity projection and the axial, coronal and
sagittal planes through the liver reference VOI, with the VOI's circle on each, so a physicist
can see where it sat. Positions are patient millimetres on a :class:`corelab.grid.Grid` (LPS):
views are in the radiological convention (patient right on the viewer's left, anterior up on
the axial plane, superior up elsewhere). :func:`series_qc_png` returns the finished figure as PNG
bytes: the same array and VOI give the same bytes, so a re-run makes no new report version.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # reports are rendered headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402

from corelab.grid import Grid  # noqa: E402
from reports.figures import png_data_uri  # noqa: E402

VOI_COLOUR = "#e67e22"
SUV_WINDOW = (0.0, 6.0)
"""Display window in SUV: fixed, so notes compare between scans (a liver at 3.6 looks darker)."""

__all__ = ["liver_voi_views", "series_qc_png", "SUV_WINDOW"]


def _extent(axis_h: np.ndarray, axis_v: np.ndarray, *, v_down: bool = False) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) in mm of voxel centres ``axis_h``, ``axis_v``."""
    dh = float(axis_h[1] - axis_h[0]) if len(axis_h) > 1 else 1.0
    dv = float(axis_v[1] - axis_v[0]) if len(axis_v) > 1 else 1.0
    left, right = axis_h[0] - dh / 2, axis_h[-1] + dh / 2
    low, high = axis_v[0] - dv / 2, axis_v[-1] + dv / 2
    return (left, right, high, low) if v_down else (left, right, low, high)


def liver_voi_views(axes: Sequence, suv: np.ndarray, grid: Grid, *, centre_mm: Sequence[float] | None,
                    radius_mm: float = 15.0, window: tuple[float, float] = SUV_WINDOW,
                    label: str = "") -> None:
    """Coronal MIP, then axial, coronal and sagittal planes through the liver VOI, on four Axes.

    Parameters
    ----------
    axes : sequence of 4 matplotlib.axes.Axes
    suv : ndarray (planes, rows, cols)
        The SUV image on ``grid``.
    grid : corelab.grid.Grid
    centre_mm : (x, y, z) or None
        The VOI centre, patient mm; None when the liver was not assessable (the planes then go
        through the centre of the volume and no circle is drawn).
    radius_mm : float
        VOI radius, mm (PERCIST: a 3 cm sphere).
    window : (low, high)
        Grey-scale window in SUV (inverted: high uptake is dark).
    label : str
        Text drawn under the MIP's title (e.g. the liver SUVmean).
    """
    z, y, x = grid.axes_mm()
    if centre_mm is not None:
        k, j, i = (int(np.clip(round(v), 0, n - 1)) for v, n in zip(grid.mm_to_index(centre_mm), suv.shape))
        cx, cy, cz = (float(v) for v in centre_mm)
    else:
        k, j, i = (n // 2 for n in suv.shape)
        cx, cy, cz = float(x[i]), float(y[j]), float(z[k])
    style = dict(cmap="gray_r", vmin=window[0], vmax=window[1], interpolation="nearest")
    views = [
        ("coronal MIP", suv.max(axis=1), _extent(x, z), (cx, cz), "x (mm)", "z (mm)"),
        (f"axial, z {cz:.0f} mm", suv[k], _extent(x, y, v_down=True), (cx, cy), "x (mm)", "y (mm)"),
        (f"coronal, y {cy:.0f} mm", suv[:, j, :], _extent(x, z), (cx, cz), "x (mm)", "z (mm)"),
        (f"sagittal, x {cx:.0f} mm", suv[:, :, i], _extent(y, z), (cy, cz), "y (mm)", "z (mm)"),
    ]
    for ax, (title, image, extent, centre, xlabel, ylabel) in zip(axes, views):
        origin = "upper" if extent[2] > extent[3] else "lower"
        ax.imshow(image, extent=extent, origin=origin, aspect="equal", **style)
        if centre_mm is not None:
            ax.add_patch(Circle(centre, radius_mm, fill=False, edgecolor=VOI_COLOUR, linewidth=1.4))
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].text(0.02, 0.02, "R", color="#1f3b5a", fontsize=7, transform=axes[0].transAxes)  # patient right
    if label:
        axes[0].set_title(f"coronal MIP\n{label}", fontsize=8)


def series_qc_png(suv: np.ndarray, grid: Grid, *, centre_mm: Sequence[float] | None, radius_mm: float = 15.0,
                  label: str = "") -> bytes:
    """The four views of :func:`liver_voi_views` as PNG bytes (same input, same bytes)."""
    # Panel widths in proportion to their width/height in mm, so the four share one height
    # (a short synthetic scan is wide, a whole-body scan tall).
    (nz, ny, nx), (dz, dy, dx) = grid.shape, grid.voxel_mm
    width, depth, height = nx * dx, ny * dy, nz * dz
    ratios = [width / height, width / depth, width / height, depth / height]
    fig_height = float(np.clip(9.0 / sum(ratios) + 0.9, 2.4, 4.8))
    fig, axes = plt.subplots(1, 4, figsize=(10.0, fig_height), constrained_layout=True,
                             gridspec_kw={"width_ratios": ratios})
    liver_voi_views(axes, suv, grid, centre_mm=centre_mm, radius_mm=radius_mm, label=label)
    return base64.b64decode(png_data_uri(fig).split(",", 1)[1])
