"""Imaging manuals as data, compiled into Great Expectations suites.

A manual (``expectations/manuals/<TRIAL>.yaml``) lists rules; each rule checks one column of the
header table (one row per series). :func:`compile_suite` turns the manual into a GX 1.x
``ExpectationSuite`` whose expectations carry the rule in ``meta``; :func:`validate` runs the
suite over many series at once (one GX run per batch, not per series) and returns one
:class:`Finding` per failing series and rule.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

MANUALS_DIR = Path(__file__).with_name("manuals")
SUITES_DIR = Path(__file__).with_name("suites")
Check = Literal["in_set", "between", "not_null"]
CHECKS: dict[str, str] = {
    "in_set": "ExpectColumnValuesToBeInSet",
    "between": "ExpectColumnValuesToBeBetween",
    "not_null": "ExpectColumnValuesToNotBeNull",
}
KEY_COLUMN = "series_uid"


class ManualError(ValueError):
    """A manual file is malformed; the message names the file, the rule and the fix."""


@dataclass(frozen=True)
class Rule:
    id: str
    section: str
    severity: str
    column: str
    check: str
    message: str
    params: dict = field(default_factory=dict)
    # More (column, params) pairs checked the same way; every one must hold (one deviation).
    also: tuple[tuple[str, dict], ...] = ()

    @property
    def checks(self) -> tuple[tuple[str, dict], ...]:
        """Every (column, params) the rule checks: its own, then ``also``."""
        return ((self.column, self.params), *self.also)

    def expected(self) -> str:
        if self.also:  # several columns: name each one's unit, else "-20 to 20 and -0.3 to 0.3" is unclear
            from expectations.header_table import COLUMNS

            return " and ".join(f"{self._expected(params)} {COLUMNS.get(column, ('', '', ''))[1]}".strip()
                                for column, params in self.checks)
        return self._expected(self.params)

    def _expected(self, params: dict) -> str:
        if self.check == "between":
            return f"{params.get('min_value')} to {params.get('max_value')}"
        if self.check == "in_set":
            values = [("yes" if v else "no") if isinstance(v, bool) else (str(v) or "none")
                      for v in params.get("value_set", [])]
            return values[0] if len(values) == 1 else "one of " + ", ".join(values)
        return "present"


@dataclass(frozen=True)
class Manual:
    trial: str
    version: str
    title: str
    standard: str
    pseudonym_pattern: str
    rules: tuple[Rule, ...]
    path: Path
    baseline_visit: str = "baseline"
    accreditation_date: str = "scan"  # scan | receipt
    visits: tuple[str, ...] = ()  # every visit label a scan may carry; () = not checked

    @property
    def columns(self) -> set[str]:
        return {column for r in self.rules for column, _ in r.checks}


@dataclass(frozen=True)
class Finding:
    series_uid: str
    rule: Rule
    observed: object


def load_manual(path_or_trial: str | Path) -> Manual:
    """Load a manual by path, or by trial code from ``expectations/manuals``."""
    path = Path(path_or_trial)
    if not path.suffix:
        path = MANUALS_DIR / f"{path_or_trial}.yaml"
    if not path.is_file():
        raise ManualError(f"imaging manual {path} not found; known: {sorted(p.stem for p in MANUALS_DIR.glob('*.yaml'))}")
    doc = yaml.safe_load(path.read_text())
    rules = []
    for i, raw in enumerate(doc.get("rules", [])):
        missing = [k for k in ("id", "section", "severity", "column", "check", "message") if k not in raw]
        if missing:
            raise ManualError(f"{path}: rule #{i + 1} ({raw.get('id', '?')}) lacks {', '.join(missing)}")
        if raw["check"] not in CHECKS:
            raise ManualError(f"{path}: rule {raw['id']} has check {raw['check']!r}; use one of {sorted(CHECKS)}")
        if raw["severity"] not in ("major", "minor"):
            raise ManualError(f"{path}: rule {raw['id']} has severity {raw['severity']!r}; use major or minor")
        also = []
        for extra in raw.get("also") or []:
            if not isinstance(extra, dict) or "column" not in extra:
                raise ManualError(f"{path}: rule {raw['id']} has an `also` entry without a column; "
                                  "write {column: ..., params: {...}}")
            also.append((extra["column"], dict(extra.get("params") or {})))
        rules.append(Rule(raw["id"], str(raw["section"]), raw["severity"], raw["column"], raw["check"],
                          raw["message"].strip(), dict(raw.get("params") or {}), tuple(also)))
    ids = [r.id for r in rules]
    if len(ids) != len(set(ids)):
        raise ManualError(f"{path}: rule ids must be unique")
    accreditation_date = doc.get("accreditation_date", "scan")
    if accreditation_date not in ("scan", "receipt"):
        raise ManualError(f"{path}: accreditation_date is {accreditation_date!r}; use scan or receipt")
    return Manual(trial=doc["trial"], version=str(doc["version"]), title=doc.get("title", ""),
                  standard=doc.get("standard", "EARL1"), pseudonym_pattern=doc.get("pseudonym_pattern", ""),
                  rules=tuple(rules), path=path, baseline_visit=doc.get("baseline_visit", "baseline"),
                  accreditation_date=accreditation_date, visits=tuple(str(v) for v in doc.get("visits") or ()))


def trial_fields(trial_code: str) -> dict:
    """The Trial row's fields from the trial's manual, or {} when the trial has no manual here."""
    if not (MANUALS_DIR / f"{trial_code}.yaml").is_file():
        return {}
    manual = load_manual(trial_code)
    fields = {"title": manual.title, "imaging_manual": manual.path.name, "manual_version": manual.version,
              "standard": manual.standard, "pseudonym_pattern": manual.pseudonym_pattern}
    if manual.visits:
        fields["deid_policy"] = {"visit_labels": list(manual.visits)}
    return fields


def suite_name(manual: Manual) -> str:
    return f"{manual.trial}-v{manual.version}"


def compile_suite(manual: Manual):
    """The manual as a GX ``ExpectationSuite`` (each expectation's ``meta`` holds its rule)."""
    import great_expectations as gx

    expectations = [
        getattr(gx.expectations, CHECKS[rule.check])(
            column=column, **params,
            meta={"rule_id": rule.id, "section": rule.section, "severity": rule.severity},
        )
        for rule in manual.rules for column, params in rule.checks
    ]
    # Passing the expectations at construction needs no data context (add_expectation does).
    return gx.ExpectationSuite(name=suite_name(manual), expectations=expectations,
                               meta={"manual": manual.path.name, "manual_version": manual.version})


def write_suite(manual: Manual, directory: Path = SUITES_DIR) -> Path:
    """Store the compiled suite as JSON beside the manuals, so it is versioned with them."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = compile_suite(manual).to_json_dict()
    doc.pop("id", None)
    for exp in doc["expectations"]:
        exp.pop("id", None)  # random per compile; dropping it keeps the stored file stable
    path = directory / f"{suite_name(manual)}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


@dataclass
class Validation:
    findings: list[Finding]
    data_docs: Path | None = None


def _context(docs_dir: Path | None):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if docs_dir is None:
        context = gx.get_context(mode="ephemeral")
    else:
        docs_dir.mkdir(parents=True, exist_ok=True)
        context = gx.get_context(mode="file", project_root_dir=str(docs_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # keep CLI output readable
    return context


def _get_or_add(getter, adder, name):
    try:
        return getter(name)
    except LookupError:  # GX's not-found errors are KeyError or LookupError subclasses
        return adder(name)


def validate(manual: Manual, table, *, docs_dir: Path | None = None) -> Validation:
    """Validate a header table (pandas DataFrame, one row per series) in one GX run.

    With ``docs_dir``, the run goes through a file-backed GX project there and its Data Docs
    (``<docs_dir>/gx/uncommitted/data_docs/local_site/index.html``) are rebuilt. Columns the
    manual names but the table lacks are added as nulls, so a missing value is a finding of a
    not-null rule rather than an error.
    """
    import great_expectations as gx

    df = table.copy()
    for column in manual.columns - set(df.columns):
        df[column] = None
    df = df.astype(object).where(df.notna(), None)
    context = _context(docs_dir)
    source = _get_or_add(context.data_sources.get, context.data_sources.add_pandas, "headers")
    asset = _get_or_add(source.get_asset, source.add_dataframe_asset, "series")
    batch = _get_or_add(asset.get_batch_definition, asset.add_batch_definition_whole_dataframe, "batch")
    suite = context.suites.add_or_update(compile_suite(manual))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite.name, data=batch, suite=suite))
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": [KEY_COLUMN]}
    docs = None
    if docs_dir is None:
        result = definition.run(batch_parameters={"dataframe": df}, result_format=result_format)
    else:
        checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
            name=f"qc-{suite.name}", validation_definitions=[definition], result_format=result_format,
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data-docs")]))
        result = next(iter(checkpoint.run(batch_parameters={"dataframe": df}).run_results.values()))
        docs = docs_dir / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    rules = {r.id: r for r in manual.rules}
    findings = []
    seen: set[tuple[str, str]] = set()  # a rule over several columns is one finding per series
    for item in result.results:
        doc = item.to_json_dict()
        if doc["success"]:
            continue
        rule = rules[doc["expectation_config"]["meta"]["rule_id"]]
        column = doc["expectation_config"]["kwargs"]["column"]
        for row in doc["result"].get("unexpected_index_list") or []:
            if (row[KEY_COLUMN], rule.id) not in seen:
                seen.add((row[KEY_COLUMN], rule.id))
                findings.append(Finding(series_uid=row[KEY_COLUMN], rule=rule, observed=row.get(column)))
    return Validation(findings, docs)
