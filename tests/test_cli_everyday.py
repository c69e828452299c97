"""Everyday commands through the real ``corelab`` entry point, on a small lab (issue 16, points 4-6).

Each listing is compared with the store read here directly (not through the code under test);
the pipe test runs the installed console script behind a real shell pipe.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
import yaml
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import Deviation, QuarantineItem, Query, Series, Site, Study, Subject, Trial, Visit
from flows.cli import main
from tests.lab_helpers import build_lab
from tests.test_cli import cli_runner
from tests.synth_fixtures import tree_digest

CORELAB = Path(sys.executable).with_name("corelab")
JUNK = 300  # enough objects that `quarantine list --objects --json` outgrows a pipe's 64 KiB buffer
OLD_DAYS = 10  # three series are moved this far back, so --since and --today have something to leave out
PLANTED_NAME = "Everyday^Planted"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The small lab, plus a junk drop (one "no series" group) and one object of a stored series
    that fails de-identification (a group whose subject and visit are known)."""
    root = tmp_path_factory.mktemp("everyday")
    settings, truth = build_lab(root)
    junk = root / "junk"
    junk.mkdir()
    for i in range(JUNK):
        (junk / f"note{i}.txt").write_text(f"not an image {i}\n")
    with session_scope(settings) as s:
        series, site = s.exec(select(Series, Site).join(Site, Series.site_id == Site.id).join(
            Study, Series.study_id == Study.id).where(Series.kind == "trial", Study.visit_id.is_not(None))
            .order_by(Series.id)).first()
        uid, site_code = series.series_uid, site.code
    source = next(p for p in (root / "trial" / "sites" / site_code).rglob("*") if p.is_file()
                  and pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == uid)
    ds = pydicom.dcmread(source)
    ds.PatientName = PLANTED_NAME
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    bad = root / "bad"
    bad.mkdir()
    ds.save_as(bad / "one.dcm", enforce_file_format=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORELAB_DATA_DIR", str(settings.data_dir))
        assert main(["ingest", str(junk), "--site", "A01", "--json"]) == 0
        assert main(["ingest", str(bad), "--site", site_code, "--json"]) == 0
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=OLD_DAYS)
    with session_scope(settings) as s:
        for i, row in enumerate(s.exec(select(Series).order_by(Series.id).limit(3))):
            row.received_at = old + dt.timedelta(minutes=i)
            s.add(row)
    return settings, truth, uid


@pytest.fixture
def cli(lab, monkeypatch, capsys):
    monkeypatch.setenv("CORELAB_DATA_DIR", str(lab[0].data_dir))
    capsys.readouterr()
    return cli_runner(capsys)


def _store_series(settings) -> dict[str, dict]:
    """Every series as the store holds it, by UID, with the codes and labels it links to."""
    with session_scope(settings) as s:
        rows = s.exec(select(Series, Site, Study, Visit, Subject, Trial)
                      .join(Site, Series.site_id == Site.id, isouter=True)
                      .join(Study, Series.study_id == Study.id, isouter=True)
                      .join(Visit, Study.visit_id == Visit.id, isouter=True)
                      .join(Subject, Visit.subject_id == Subject.id, isouter=True)
                      .join(Trial, Series.trial_id == Trial.id, isouter=True)).all()
        return {se.series_uid: {"site": si.code if si else "", "subject": su.pseudonym if su else "",
                                "visit": v.label if v else "", "modality": se.modality, "kind": se.kind,
                                "instances": se.instance_count,
                                "expected": "" if se.expected_count is None else se.expected_count,
                                "state": se.state, "qc_state": se.qc_state, "received": se.received_at,
                                "trial": t.code if t else ""}
                for se, si, _st, v, su, t in rows}


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def test_series_list_shows_site_subject_visit_and_agrees_with_the_store(cli, lab):
    store = _store_series(lab[0])
    rows, _ = cli("series", "list", "--json")
    assert len(rows) == len(store) and {r["series_uid"] for r in rows} == set(store)
    for r in rows:
        want = store[r["series_uid"]]
        assert {k: r[k] for k in want if k not in ("trial", "received")} == {
            k: v for k, v in want.items() if k not in ("trial", "received")}
        assert _when(r["received"]) == want["received"]
    assert any(r["subject"] and r["visit"] for r in rows) and any(r["kind"] == "phantom" for r in rows)
    assert [_when(r["received"]) for r in rows] == sorted((_when(r["received"]) for r in rows), reverse=True)

    table, _ = cli("series", "list")
    header, *lines = table.splitlines()
    assert header.split() == ["site", "subject", "visit", "modality", "kind", "instances", "expected", "state",
                              "qc_state", "received", "series_uid"]
    assert len(lines) == len(rows)
    for line, r in zip(lines, rows):  # same order; the UID last, cut to its tail, never whole in the table
        assert line.rstrip().endswith(r["series_uid"][-14:]) and r["series_uid"] not in line
        assert line.startswith(r["site"]) and (r["subject"] in line.split())  == bool(r["subject"])


def test_series_list_filters_by_site_trial_and_time(cli, lab):
    store = _store_series(lab[0])
    for site in ("A01", "C03"):
        rows, _ = cli("series", "list", "--site", site, "--json")
        assert {r["series_uid"] for r in rows} == {u for u, v in store.items() if v["site"] == site} != set()
    trial = lab[1]["trial_code"]
    rows, _ = cli("series", "list", "--trial", trial, "--json")
    assert {r["series_uid"] for r in rows} == {u for u, v in store.items() if v["trial"] == trial} != set()

    now = dt.datetime.now(dt.timezone.utc)
    midnight = dt.datetime.combine(now.date(), dt.time.min, tzinfo=dt.timezone.utc)
    old = {u for u, v in store.items() if v["received"] < midnight}
    assert len(old) == 3
    rows, _ = cli("series", "list", "--today", "--json")
    assert {r["series_uid"] for r in rows} == set(store) - old
    day = (now - dt.timedelta(days=OLD_DAYS // 2)).date().isoformat()
    rows, _ = cli("series", "list", "--since", day, "--json")
    assert {r["series_uid"] for r in rows} == set(store) - old
    # A date-time with an offset means that instant: the second-oldest series' own arrival keeps it.
    second = sorted(store.items(), key=lambda kv: kv[1]["received"])[1]
    at = second[1]["received"].astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
    rows, _ = cli("series", "list", "--since", at, "--json")
    assert {r["series_uid"] for r in rows} == {u for u, v in store.items() if v["received"] >= second[1]["received"]}
    assert second[0] in {r["series_uid"] for r in rows} and len(rows) == len(store) - 1
    rows, _ = cli("series", "list", "--since", (now + dt.timedelta(days=1)).date().isoformat(), "--json")
    assert rows == []
    out, _ = cli("series", "list", "--since", (now + dt.timedelta(days=1)).date().isoformat())
    assert out.strip() == "(none)"


@pytest.mark.parametrize("value", ["2024-02-30", "yesterday", "2024-01-01T25:00", "01/02/2024", ""])
def test_series_list_refuses_a_bad_date_with_the_value_and_the_forms(cli, value):
    out, err = cli("series", "list", "--since", value, expect=2)
    assert out == "" and "Traceback" not in err
    assert f"--since {value!r} is not a date or date-time" in err and "YYYY-MM-DD" in err


def test_series_list_refuses_unknown_codes_and_both_windows(cli, capsys):
    _, err = cli("series", "list", "--site", "Z99", expect=2)
    assert "no site 'Z99'" in err and "A01" in err
    _, err = cli("series", "list", "--trial", "NO-TRIAL", expect=2)
    assert "no trial 'NO-TRIAL'" in err
    with pytest.raises(SystemExit) as exc:
        main(["series", "list", "--today", "--since", "2024-01-01"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_deviations_table_leads_with_the_id_that_query_and_waive_take(cli, lab):
    rows, _ = cli("deviations", "--json")
    table, _ = cli("deviations")
    header, *lines = table.splitlines()
    assert header.split()[:2] == ["id", "site"]
    with session_scope(lab[0]) as s:
        ids = {d.id for d in s.exec(select(Deviation))}
    assert [int(line.split()[0]) for line in lines] == [r["id"] for r in rows] and set(r["id"] for r in rows) == ids
    first, second = (int(line.split()[0]) for line in lines[:2])
    opened, _ = cli("query", "open", str(first), "--text", "please check the dose", "--as", "phys", "--json")
    waived, _ = cli("deviation", "waive", str(second), "--reason", "known protocol change", "--as", "phys",
                    "--json")
    with session_scope(lab[0]) as s:
        assert s.exec(select(Query).where(Query.deviation_id == first)).one().status == "open"
        assert s.get(Deviation, second).status == "waived" and s.get(Deviation, first).status == "queried"


def _store_quarantine_groups(settings) -> dict[tuple, dict]:
    with session_scope(settings) as s:
        sites = {x.id: x.code for x in s.exec(select(Site))}
        groups: dict[tuple, dict] = defaultdict(lambda: {"objects": 0, "codes": set(), "newest": None})
        for q in s.exec(select(QuarantineItem).where(QuarantineItem.released_at.is_(None))):
            g = groups[(sites.get(q.site_id, "(unknown)"), q.series_uid)]
            g["objects"] += 1
            g["codes"].add(q.reason_code)
            g["newest"] = max(g["newest"] or q.received_at, q.received_at)
        return dict(groups)


def test_quarantine_list_groups_by_series_with_subject_and_visit(cli, lab):
    settings, _truth, known_uid = lab
    store = _store_quarantine_groups(settings)
    rows, _ = cli("quarantine", "list", "--json")
    assert {(r["site"], r["series_uid"]): (r["objects"], set(r["reason_codes"]), _when(r["newest"]))
            for r in rows} == {k: (g["objects"], g["codes"], g["newest"]) for k, g in store.items()}
    assert len(rows) == len(store) >= 3
    junk = next(r for r in rows if r["series_uid"] is None)
    assert (junk["site"], junk["objects"], junk["reason_codes"]) == ("A01", JUNK, ["not_dicom"])
    known = next(r for r in rows if r["series_uid"] == known_uid)
    want = _store_series(settings)[known_uid]
    assert (known["subject"], known["visit"], known["objects"], known["reason_codes"]) == (
        want["subject"], want["visit"], 1, ["deid_failed"]) and want["subject"]
    unknown = [r for r in rows if r["series_uid"] not in (None, known_uid)]
    assert unknown and all(r["subject"] == r["visit"] == "" for r in unknown)  # series never stored

    table, _ = cli("quarantine", "list")
    header, *lines = table.splitlines()
    assert header.split() == ["site", "subject", "visit", "series", "objects", "reasons", "newest"]
    assert len(lines) == len(rows)
    junk_line = next(line for line in lines if "no series" in line)
    assert f" {JUNK} " in junk_line and "not_dicom" in junk_line
    known_line = next(line for line in lines if known_uid[-14:] in line)
    assert known["subject"] in known_line and known["visit"] in known_line and known_uid not in known_line
    assert PLANTED_NAME.split("^")[1] not in table + json.dumps(rows)


def test_quarantine_list_objects_keeps_one_row_per_object_with_ids_for_release(cli, lab):
    rows, _ = cli("quarantine", "list", "--objects", "--json")
    with session_scope(lab[0]) as s:
        open_ids = {q.id for q in s.exec(select(QuarantineItem).where(QuarantineItem.released_at.is_(None)))}
    assert {r["id"] for r in rows} == open_ids and len(rows) == len(open_ids) >= JUNK + 1
    table, _ = cli("quarantine", "list", "--objects")
    header, *lines = table.splitlines()
    assert header.split()[:4] == ["id", "site", "source", "reason_code"] and len(lines) == len(rows)
    junk_id = next(r["id"] for r in rows if r["reason_code"] == "not_dicom")
    released, _ = cli("quarantine", "release", str(junk_id), "--json", expect=1)  # still not DICOM
    assert released == {"id": junk_id, "status": "quarantined", "reason": released["reason"]}


def _piped(command: str, env_dir: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "CORELAB_DATA_DIR": str(env_dir)}
    return subprocess.run(["bash", "-c", f"set -o pipefail; {CORELAB} {command}"], env=env,
                          capture_output=True, text=True, timeout=120)


def test_piped_to_head_ends_quietly(lab):
    settings = lab[0]
    # Bigger than the pipe's buffer: head has gone while corelab still writes, every time.
    big = _piped("quarantine list --objects --json | head -1", settings.data_dir)
    assert big.stdout == "[\n" and big.stderr == "" and big.returncode == 141
    small = _piped("series list | head -1", settings.data_dir)
    assert small.stdout.split() == ["site", "subject", "visit", "modality", "kind", "instances", "expected",
                                    "state", "qc_state", "received", "series_uid"]
    assert small.stderr == "" and small.returncode in (0, 141)
    gone = _piped("deviations | true", settings.data_dir)  # the reader left before corelab started writing
    assert gone.stderr == "" and gone.returncode == 141
    # A user error still says what is wrong (exit 2), pipe or not.
    bad = _piped("series list --since nope | head -1", settings.data_dir)
    assert bad.returncode == 2 and "--since 'nope' is not a date" in bad.stderr and "Traceback" not in bad.stderr


def _small_spec_file(path: Path, **override) -> Path:
    from synth.spec import small_spec

    data = dataclasses.asdict(small_spec())
    del data["first_scan_date"]  # a spec that does not date its trial
    path.write_text(yaml.safe_dump(json.loads(json.dumps({**data, **override}))))
    return path


def _phantom_days(truth: dict) -> set[dt.date]:
    return {dt.datetime.strptime(s["header"]["StudyDate"], "%Y%m%d").date()
            for s in truth["series"] if s["kind"] == "phantom"}


def test_synth_dates_its_trial_relative_to_today_and_reproduces_with_seed_and_date(cli, tmp_path):
    spec = _small_spec_file(tmp_path / "spec.yaml")
    today = dt.date.today()
    made, _ = cli("synth", str(tmp_path / "a"), "--seed", "4", "--spec", str(spec), "--json")
    truth = json.loads((tmp_path / "a" / "ground_truth.json").read_text())
    assert made["first_scan_date"] == truth["spec"]["first_scan_date"] == (today - dt.timedelta(days=21)).isoformat()
    # Its phantoms were scanned weeks ago, not years: inside the quarterly cadence, so not expired.
    assert all(today - dt.timedelta(days=50) <= d <= today for d in _phantom_days(truth))

    cli("synth", str(tmp_path / "b"), "--seed", "4", "--spec", str(spec), "--date", made["first_scan_date"])
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")  # same seed, same date: same bytes
    other, _ = cli("synth", str(tmp_path / "c"), "--seed", "4", "--spec", str(spec), "--date", "2024-03-04",
                   "--json")
    assert other["first_scan_date"] == "2024-03-04"
    assert all(d < dt.date(2024, 3, 4) for d in _phantom_days(json.loads((tmp_path / "c" / "ground_truth.json")
                                                                          .read_text())))
    dated = _small_spec_file(tmp_path / "dated.yaml", first_scan_date="2023-05-01")
    kept, _ = cli("synth", str(tmp_path / "d"), "--seed", "4", "--spec", str(dated), "--json")
    assert kept["first_scan_date"] == "2023-05-01"  # a spec that dates its trial keeps its date


def test_synth_refuses_a_bad_date(cli, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["synth", str(tmp_path / "x"), "--date", "2024-13-01"])
    assert exc.value.code == 2 and "'2024-13-01' is not a date; use YYYY-MM-DD" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_demo_step_durations_are_formatted():
    from flows.demo import STEPS, duration_text, step_text

    assert [duration_text(s) for s in (0.04, 14.25, 59.94, 60.4, 125.0, 3600)] == [
        "0.0 s", "14.2 s", "59.9 s", "1 min 00 s", "2 min 05 s", "60 min 00 s"]
    assert step_text(0) == f"[1/{len(STEPS)}] {STEPS[0]} ..."


@pytest.mark.prefect
def test_demo_progress_lines_end_with_each_steps_duration(prefect_harness, capsys):
    """The progress of a run: one line per step, its name and then how long it took (not the
    time since the start)."""
    from prefect import flow

    from flows.demo import STEPS, _Progress

    waits = [0.05, 0.6, 0.05, 0.3, 0.05, 0.05, 0.05]

    @flow
    def steps():
        progress = _Progress(quiet=False)
        for i, wait in enumerate(waits):
            progress.step(i)
            time.sleep(wait)
        progress.step(len(STEPS))

    steps()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(lines) == len(STEPS)
    for i, (line, wait) in enumerate(zip(lines, waits)):
        head, _, took = line.rpartition(" ... ")
        assert head == f"[{i + 1}/{len(STEPS)}] {STEPS[i]}" and took.endswith(" s")
        assert wait <= float(took[:-2]) < wait + 0.5  # this step's own time, not the running total


def test_font_subset_fallback_warns_once_and_other_weasyprint_warnings_still_show(tmp_path, monkeypatch, caplog):
    """Without libharfbuzz-subset0 WeasyPrint warned for every font of every PDF (26 lines in a
    demo). The library is installed here, so its absence is simulated at WeasyPrint's own switch."""
    import logging

    import weasyprint.pdf.fonts

    from reports.render import html_to_pdf

    monkeypatch.setattr(weasyprint.pdf.fonts, "harfbuzz_subset", None)
    monkeypatch.setattr(logging.getLogger("weasyprint"), "filters", [])  # a fresh process, whatever ran before
    page = ('<html><body style="font-family: \'DejaVu Sans\'">text <b>bold</b> '
            '<span style="font-family: \'DejaVu Sans Mono\'; bogus-property: 1">mono</span></body></html>')
    with caplog.at_level(logging.WARNING, logger="weasyprint"):
        for i in range(3):
            html_to_pdf(page, tmp_path / f"r{i}.pdf")
    subset = [r for r in caplog.records if "HarfBuzz-Subset" in r.getMessage()]
    assert len(subset) == 1 and "libharfbuzz-subset0" in subset[0].getMessage()
    assert sum("bogus-property" in r.getMessage() for r in caplog.records) == 3  # the rest is not hidden
    assert all((tmp_path / f"r{i}.pdf").read_bytes().startswith(b"%PDF") for i in range(3))


def test_a_broken_pipe_that_is_not_stdouts_is_raised_not_hidden(lab, monkeypatch):
    """A command whose own socket breaks (SMTP, an archive) while stdout is no pipe at all (embedded
    use, captured output): the error reaches the caller, it is not taken for `| head`."""
    import io

    import flows.cli as cli_module

    monkeypatch.setenv("CORELAB_DATA_DIR", str(lab[0].data_dir))
    monkeypatch.setattr(sys, "stdout", io.StringIO())

    def breaks(_args):
        raise BrokenPipeError(32, "Broken pipe (the archive hung up)")
    import flows.cli_series

    monkeypatch.setattr(flows.cli_series, "cmd_series_list", breaks)  # the parser is built at each main()
    with pytest.raises(BrokenPipeError, match="archive hung up"):
        cli_module.main(["series", "list"])


def test_a_quarantined_object_naming_another_sites_series_shows_no_subject_of_that_site(lab):
    """B02's object that names A01's series UID is listed under B02, without A01's subject or visit."""
    from services import lookup

    settings, _truth, _uid = lab
    with session_scope(settings) as s:
        series, owner = s.exec(select(Series, Site).join(Site, Series.site_id == Site.id).join(
            Study, Series.study_id == Study.id).where(Study.visit_id.is_not(None)).order_by(Series.id)).first()
        other = s.exec(select(Site).where(Site.id != owner.id).order_by(Site.id)).first()
        s.add(QuarantineItem(site_id=other.id, source_name="object #1 (sha256 0123456789ab)",
                             series_uid=series.series_uid, path="quarantine/x.dcm", sha256="0" * 64,
                             reason_code="uid_conflict", reason="test"))
    with session_scope(settings) as s:
        rows = lookup.quarantine_groups(s)
    mine = [r for r in rows if r["site"] == other.code and r["series_uid"] == series.series_uid]
    assert len(mine) == 1 and (mine[0]["subject"], mine[0]["visit"]) == ("", ""), mine
