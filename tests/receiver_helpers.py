"""Helpers for the receiver tests: dcmtk senders, a TLS node, small synthetic PET series, store queries."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, select

from corelab.db import session_scope
from corelab.models import AuditEvent, Instance, Series
from corelab.receiver import Receiver, ReceiverConfig
from corelab.register import add_site
from corelab.settings import Settings
from synth.net import free_port, wait_for, wait_port  # noqa: F401  (re-exported to the tests)
from synth.small_series import write_pet_slices

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def small_series(outdir: Path, n: int, matrix: int = 8) -> list[Path]:
    """``n`` de-identified PET slices (tiny images: the tests measure the protocol, not pixels)."""
    return write_pet_slices(outdir, n=n, matrix=matrix)


def storescu(port: int, paths, *, aet: str, aec: str = "CORELAB", extra: tuple[str, ...] = (),
             timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [STORESCU, "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"storescu exit {proc.returncode}: {proc.stderr[-3000:]}")
    return proc


def echoscu(port: int, *, aet: str, aec: str = "CORELAB") -> subprocess.CompletedProcess:
    return subprocess.run([ECHOSCU, "-aet", aet, "-aec", aec, "127.0.0.1", str(port)], capture_output=True,
                          text=True, env=DCMTK_ENV, timeout=60)


def start_tls_node(settings: Settings, tmp_path: Path) -> tuple[Receiver, Path]:
    """A started receiver speaking DICOM TLS only, with site S1 (AE title SITE1) registered.

    Its self-signed key and certificate are made in ``tmp_path``; returns the receiver (the
    caller stops it) and the certificate (for the sender's ``+cf``).
    """
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=3600, tls_cert=cert,
                                                 tls_key=key)).start()
    return receiver, cert


def instance_count(session: Session) -> int:
    return session.exec(select(func.count()).select_from(Instance)).one()


def assert_store_exact(session: Session, data_dir: Path, sop_uids: set[str]) -> None:
    """Every SOP instance exactly once (version 1), and every file matches its sha256."""
    rows = session.exec(select(Instance)).all()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sop_uids), "lost or duplicated instances"
    assert {r.version for r in rows} == {1}
    for row in rows:
        data = (data_dir / row.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size_bytes, row.path
    assert not list(data_dir.rglob("*.partial")), "half-written files left behind"


def qc_claims(session: Session, series_uid: str) -> int:
    return len(session.exec(select(AuditEvent).where(AuditEvent.action == "series.qc_queued",
                                                     AuditEvent.entity_id == series_uid)).all())


def series_by_uid(session: Session, uid: str) -> Series | None:
    return session.exec(select(Series).where(Series.series_uid == uid)).first()
