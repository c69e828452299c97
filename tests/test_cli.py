"""The command line: help everywhere, JSON where machines read, clear errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from flows.cli import build_parser, main


def _commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def cli_runner(capsys):
    """``run(*argv, expect=0)``: the corelab command in this process; ``(output, stderr)``, the
    output parsed when ``--json`` is given; asserts the exit code."""
    def run(*argv, expect=0):
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert code == expect, (argv, out, err)
        return json.loads(out) if "--json" in argv else out, err
    return run


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CORELAB_DATA_DIR", str(tmp_path / "data"))
    return cli_runner(capsys)


def test_every_command_has_help(capsys):
    commands = list(_commands(build_parser()))
    assert len(commands) >= 15
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: corelab" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("corelab ")


def test_first_command_creates_and_migrates_the_data_dir(cli, tmp_path):
    data, _ = cli("settings", "--json")
    from corelab.db import head_revision

    assert data["schema_revision"] == head_revision()
    assert (tmp_path / "data" / "corelab.db").is_file() and (tmp_path / "data" / "spool").is_dir()


def test_site_register_round_trip(cli):
    cli("site", "add", "A01", "--ae-title", "SITE_A01", "--host", "10.1.2.3")
    sites, _ = cli("site", "list", "--json")
    assert sites == [{"site": "A01", "name": "", "ae_title": "SITE_A01", "host": "10.1.2.3"}]
    _, err = cli("site", "add", "B02", "--ae-title", "A_TITLE_THAT_IS_TOO_LONG", expect=2)
    assert "not a valid DICOM AE title" in err


def test_ingest_series_quarantine_and_audit(cli, tmp_path):
    from synth.spec import small_spec
    from synth.trial import generate_trial

    trial = tmp_path / "trial"
    truth = generate_trial(trial, small_spec(), seed=3)
    cli("register", "load", str(trial / "register.yaml"))
    (trial / "sites" / "C03" / "junk.txt").write_text("not an image")
    summary, _ = cli("ingest", str(trial / "sites" / "C03"), "--site", "C03", "--json")
    n_files = sum(s["n_files"] for s in truth.series if s["site"] == "C03")
    assert summary["objects"] == n_files + 1 and summary["quarantined"] >= 1
    series, _ = cli("series", "list", "--json")
    assert {s["series_uid"] for s in series} == {s["series_uid"] for s in truth.series if s["site"] == "C03"}
    held, _ = cli("quarantine", "list", "--objects", "--json")
    assert any(h["reason_code"] == "not_dicom" and h["source"].startswith("object #")
               and "junk.txt" not in json.dumps(h) for h in held)
    # Releasing it again checks it again: still not DICOM, so it stays, and the try is audited
    # with the login name, as the portal's release is with the user's.
    junk = next(h["id"] for h in held if h["reason_code"] == "not_dicom")
    released, _ = cli("quarantine", "release", str(junk), "--json", expect=1)
    assert released["status"] == "quarantined"
    cli("quarantine", "release", "999999", expect=2)
    import getpass

    from sqlmodel import select

    from corelab.db import session_scope
    from corelab.models import AuditEvent
    from corelab.settings import load_settings

    with session_scope(load_settings()) as s:
        events = [(e.actor, e.entity_id, e.detail) for e in s.exec(
            select(AuditEvent).where(AuditEvent.action == "quarantine.release"))]
    assert [(actor, entity_id) for actor, entity_id, _ in events] == [(f"cli:{getpass.getuser()}", str(junk))]
    assert events[0][2]["status"] == "quarantined" and events[0][2]["reason_code"] == "not_dicom"
    audit, _ = cli("audit", "verify", "--json")
    assert audit["intact"] is True and audit["problems"] == []


def test_ingest_starts_qc_of_the_series_it_completes(cli, tmp_path):
    """A file drop's completed series are claimed for QC once, as the DICOM node claims them:
    queued for the nightly QC by default (``--qc flow`` runs the flow at once)."""
    from synth.spec import small_spec
    from synth.trial import generate_trial

    trial = tmp_path / "trial"
    truth = generate_trial(trial, small_spec(), seed=3)
    cli("register", "load", str(trial / "register.yaml"))
    summary, _ = cli("ingest", str(trial / "sites" / "C03"), "--site", "C03", "--json")
    series, _ = cli("series", "list", "--json")
    assert summary["qc_started"] == len(series) == sum(1 for s in truth.series if s["site"] == "C03")
    assert {s["qc_state"] for s in series} == {"queued"}
    again, _ = cli("ingest", str(trial / "sites" / "C03"), "--site", "C03", "--json")
    assert again["qc_started"] == 0  # claimed once, ever


def test_phantom_analyze_prints_spheres_and_verdict(cli, tmp_path):
    from synth.spec import small_spec
    from synth.trial import generate_trial

    truth = generate_trial(tmp_path / "trial", small_spec(), seed=0)
    entry = next(s for s in truth.series if s["kind"] == "phantom" and s["scanner"] == "C03-1"
                 and s["phantom"]["fill"]["kind"] == "nema_iec")
    result, _ = cli("phantom", "analyze", str(tmp_path / "trial" / entry["path"]), "--fill",
                    str(tmp_path / "trial" / entry["phantom"]["fill_sheet"]), "--json", expect=1)
    assert [s["diameter_mm"] for s in result["spheres"]] == [10, 13, 17, 22, 28, 37]
    assert {"rc_max", "rc_mean", "rc_peak", "percent_contrast"} <= set(result["spheres"][0])
    assert result["verdict"] == "fail" and result["standard"] == "EARL1"
    assert "decayed to the scan reference time" in json.dumps(result["fill"]["provenance"])


def test_bad_fill_sheet_is_a_clear_error(cli, tmp_path):
    fill = tmp_path / "f.yaml"
    fill.write_text("kind: nema_iec\nsphere_kbq_ml: 20\n")
    (tmp_path / "empty").mkdir()
    _, err = cli("phantom", "analyze", str(tmp_path / "empty"), "--fill", str(fill), expect=2)
    assert "'background_kbq_ml' is missing" in err
