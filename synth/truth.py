"""Scoring QC against a synthetic trial's ground truth.

Maps each injected problem of :mod:`synth.problems` to what the pipeline must report under the
example manual (``FDG-RESP-01``): deviation rule ids, or a quarantine reason. The score lists what
was expected and found, what was missed, and what was found but not injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# problem code -> findings on the problem's own series ("quarantine:<code>" for a quarantine reason)
FINDINGS_OF_PROBLEM: dict[str, frozenset[str]] = {
    "uptake_out_of_window": frozenset({"uptake_window"}),
    "missing_weight": frozenset({"weight_recorded", "suv_computable", "header_complete"}),
    "wrong_units": frozenset({"units_bqml", "suv_computable"}),
    # SUV converts the MBq dose (with a warning), so suv_computable passes; the activity rules report it.
    "dose_in_mbq": frozenset({"activity_plausible_mbq", "activity_per_kg"}),
    "scanner_not_accredited": frozenset({"scanner_accredited"}),
    "software_version_changed": frozenset({"scanner_software_registered"}),
    "patient_name_in_header": frozenset({"quarantine:deid_failed"}),
    "missing_slice": frozenset({"series_complete"}),
    # The other scanner is another vendor's, so the reconstruction differs too.
    "followup_on_other_scanner": frozenset({"same_scanner_as_baseline", "same_reconstruction_as_baseline"}),
    # Image problems (expectations.image): the headers are valid, the pixels are not.
    "liver_calibration_error": frozenset({"liver_suv_range"}),
    "ct_misaligned": frozenset({"petct_alignment"}),
    "missing_bed_position": frozenset({"bed_position_missing"}),
    "noisy_scan": frozenset({"liver_noise"}),
}
FOLLOWUP_UPTAKE_RULE = "followup_uptake_matches_baseline"
FOLLOWUP_LIVER_RULE = "liver_sul_vs_baseline"

# Problems that also break a follow-up-versus-baseline comparison, and the rule that reports it
# on the follow-up (the problem's own series when it is on the follow-up).
_FOLLOWUP_RULE_OF_PROBLEM = {
    "uptake_out_of_window": FOLLOWUP_UPTAKE_RULE,
    "liver_calibration_error": FOLLOWUP_LIVER_RULE,
}


@dataclass
class Score:
    expected: set[tuple[str, str]] = field(default_factory=set)
    found: set[tuple[str, str]] = field(default_factory=set)

    @property
    def missed(self) -> set[tuple[str, str]]:
        return self.expected - self.found

    @property
    def unexpected(self) -> set[tuple[str, str]]:
        return self.found - self.expected

    def as_dict(self) -> dict:
        return {"expected": len(self.expected), "found_expected": len(self.expected & self.found),
                "missed": sorted(f"{uid[-10:]}:{c}" for uid, c in self.missed),
                "unexpected": sorted(f"{uid[-10:]}:{c}" for uid, c in self.unexpected)}


def expected_findings(truth: dict) -> set[tuple[str, str]]:
    """(series UID, finding) pairs the pipeline must report for a ground-truth document."""
    pet = {(s["subject"], s["visit"]): s["series_uid"] for s in truth["series"]
           if s["kind"] == "trial" and s["modality"] == "PT"}
    baseline = truth["spec"]["visits"][0]
    out: set[tuple[str, str]] = set()
    for problem in truth["problems"]:
        for finding in FINDINGS_OF_PROBLEM[problem["code"]]:
            if finding.startswith("quarantine:") or problem["modality"] == "PT":
                out.add((problem["series_uid"], finding))
        rule = _FOLLOWUP_RULE_OF_PROBLEM.get(problem["code"])
        if rule is not None:
            # An out-of-window uptake or a miscalibrated liver also breaks the follow-up-versus-
            # baseline match: on the follow-ups when the problem is on the baseline.
            if problem["visit"] == baseline:
                others = [uid for (subj, visit), uid in pet.items() if subj == problem["subject"] and visit != baseline]
                out.update((uid, rule) for uid in others)
            else:
                out.add((problem["series_uid"], rule))
    return out


def score(truth: dict, deviations: list[dict], quarantined: list[dict]) -> Score:
    """Compare deviations (``series_uid``, ``rule_id``) and quarantined series (``series_uid``,
    ``reason_code``) with the ground truth."""
    found = {(d["series_uid"], d["rule_id"]) for d in deviations}
    found |= {(q["series_uid"], f"quarantine:{q['reason_code']}") for q in quarantined if q.get("series_uid")}
    return Score(expected=expected_findings(truth), found=found)
