"""Shared fixtures: isolated settings, a real PostgreSQL server, one Prefect test harness.

PostgreSQL: ``CORELAB_TEST_DATABASE_URL`` names a server to use (an admin URL whose user may
CREATE DATABASE); without it the tests start a throwaway server from the installed PostgreSQL
binaries (Debian package ``postgresql``) and stop it at the end. A missing server is a failure,
not a skip: the store must be proven on both backends.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

# Prefect reads its home at import; keep test runs away from the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="corelab-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).with_name("data")


@pytest.fixture
def settings_env(tmp_path):
    """An environment for ``load_settings`` whose data directory is a fresh temporary folder."""
    return {"CORELAB_DATA_DIR": str(tmp_path / "corelab-data")}


@pytest.fixture
def settings(settings_env):
    from corelab.settings import load_settings

    return load_settings(settings_env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        found = shutil.which("initdb")
        if not found:
            pytest.fail("PostgreSQL is not installed: run `make system-deps` (Debian package postgresql) "
                        "or set CORELAB_TEST_DATABASE_URL to a server")
        return Path(found).resolve().parent
    return Path(candidates[-1]).parent


@pytest.fixture(scope="session")
def postgres_admin_url():
    """URL of a PostgreSQL server whose user may create databases."""
    given = os.environ.get("CORELAB_TEST_DATABASE_URL")
    if given:
        yield given
        return
    bindir = _pg_bindir()
    workdir = Path(tempfile.mkdtemp(prefix="corelab-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root and there is no 'postgres' user to run a test server as")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    datadir, port = workdir / "data", _free_port()
    subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(datadir), "-U", "corelab", "--auth=trust",
                             "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(datadir), "-w", "-l", str(workdir / "log"),
                             "-o", f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off",
                             "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://corelab@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_admin_url):
    """A fresh, empty database on the test server, dropped afterwards."""
    import psycopg

    name = f"corelab_test_{uuid.uuid4().hex[:12]}"
    plain = postgres_admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = postgres_admin_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    from corelab.db import _engines

    for url in [u for u in _engines if u.endswith(name)]:
        _engines.pop(url).dispose()
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(request, settings_env):
    """Settings for each backend in turn: SQLite in the data directory, then PostgreSQL."""
    from corelab.settings import load_settings

    env = dict(settings_env)
    if request.param == "postgresql":
        env["CORELAB_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    return load_settings(env)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness per session (it costs 11-16 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
