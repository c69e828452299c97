"""What happened to received objects: one :class:`Outcome` per object, an :class:`IngestSummary`
per drop. Shared by the ingest (:mod:`corelab.ingest`), the quarantine (:mod:`corelab.quarantine`)
and their callers (the node, STOW-RS, the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["IngestSummary", "Outcome"]


@dataclass(frozen=True)
class Outcome:
    """What happened to one received object; ``source`` is its label (ordinal, sha256 prefix)."""

    source: str
    status: str  # stored | duplicate | new_version | quarantined
    series_uid: str | None = None
    reason_code: str | None = None
    reason: str | None = None


@dataclass
class IngestSummary:
    outcomes: list[Outcome] = field(default_factory=list)
    series_uids: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def as_dict(self) -> dict:
        return {
            "objects": len(self.outcomes),
            "stored": self.count("stored"),
            "duplicates": self.count("duplicate"),
            "new_versions": self.count("new_version"),
            "quarantined": self.count("quarantined"),
            "series": self.series_uids,
            "quarantine": [
                {"source": o.source, "reason_code": o.reason_code, "reason": o.reason}
                for o in self.outcomes if o.status == "quarantined"
            ],
        }
