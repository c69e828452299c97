"""Calibration QC over time: control limits and drift alarms per scanner.

Each uniform-cylinder result gives one point, the SUV (calibration) bias in percent. A point is
judged against fixed limits (warning and action, in percent; the action limit is EARL's +/-10 %
acceptance) and, once a scanner has enough history, against statistical limits (mean +/- 3 SD of
the earlier points, a Shewhart individuals chart). The newest point decides the alarm.
"""

from __future__ import annotations

import datetime as dt
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ControlLimits:
    warning_pct: float = 5.0
    action_pct: float = 10.0
    min_history: int = 5  # points before the newest that the statistical limits need


@dataclass(frozen=True)
class DriftResult:
    """Judgement of a scanner's calibration series.

    ``level`` is ``ok``, ``warning`` (outside the warning limit) or ``action`` (outside the action
    limit or the statistical limits): ``alarm`` is True for ``action``.
    """

    scanner: str
    points: tuple[tuple[dt.date, float], ...]
    level: str
    reason: str
    limits: ControlLimits
    statistical_limits_pct: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def alarm(self) -> bool:
        return self.level == "action"

    def to_dict(self) -> dict:
        return {"scanner": self.scanner, "level": self.level, "alarm": self.alarm, "reason": self.reason,
                "points": [(d.isoformat(), b) for d, b in self.points],
                "warning_pct": self.limits.warning_pct, "action_pct": self.limits.action_pct,
                "statistical_limits_pct": self.statistical_limits_pct}


def judge_calibration(scanner: str, points: list[tuple[dt.date, float]], *,
                      limits: ControlLimits = ControlLimits()) -> DriftResult:
    """Judge the newest calibration bias of ``scanner`` (``points``: (scan date, bias %))."""
    points = sorted(points)
    if not points:
        return DriftResult(scanner, (), "ok", "no calibration QC yet", limits)
    when, bias = points[-1]
    history = [b for _, b in points[:-1]]
    stat = None
    if len(history) >= limits.min_history:
        mean, sd = statistics.fmean(history), statistics.stdev(history)
        stat = (mean - 3 * sd, mean + 3 * sd)
    if abs(bias) > limits.action_pct:
        level, reason = "action", f"bias {bias:+.1f} % on {when} is outside the action limit +/-{limits.action_pct} %"
    elif stat and not stat[0] <= bias <= stat[1]:
        level, reason = "action", (f"bias {bias:+.1f} % on {when} is outside the control limits "
                                   f"{stat[0]:+.1f} to {stat[1]:+.1f} % of its history (mean +/- 3 SD): drift")
    elif abs(bias) > limits.warning_pct:
        level, reason = "warning", f"bias {bias:+.1f} % on {when} is outside the warning limit +/-{limits.warning_pct} %"
    else:
        level, reason = "ok", f"bias {bias:+.1f} % on {when} is within limits"
    return DriftResult(scanner, tuple(points), level, reason, limits, stat)
