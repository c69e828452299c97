"""The store: engine, sessions and migrations.

Any command calls :func:`open_store` first; it creates the data directory and brings the schema
to the newest migration, so a fresh data directory (or a fresh PostgreSQL database) is ready on
first use and an old one is upgraded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, create_engine

from corelab import audit
from corelab.settings import Settings, load_settings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_engines: dict[str, Engine] = {}
_LOG = logging.getLogger("corelab.db")
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL + busy_timeout: several processes (receiver, flows, CLI) write at once without
    # "database is locked"; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(database_url: str) -> Engine:
    """Create an engine for ``database_url`` with the per-backend settings corelab relies on."""
    if database_url.startswith("sqlite"):
        engine = create_engine(database_url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(database_url, pool_pre_ping=True)
    return engine


def get_engine(settings: Settings | None = None) -> Engine:
    """The process-wide engine for the settings' database (one per URL).

    A new engine's audit chain is anchored in the settings' data directory
    (:func:`corelab.audit.bind_anchor`): every store corelab opens comes through here.
    """
    settings = settings or load_settings()
    with _lock:
        engine = _engines.get(settings.database_url)
        if engine is None:
            engine = _engines[settings.database_url] = make_engine(settings.database_url)
            audit.bind_anchor(engine, settings.data_dir)  # the chain's head is kept in the data dir too
    return engine


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is ConfigParser interpolation syntax; URL-encoded passwords contain it.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema of ``engine``'s database to ``revision`` through Alembic."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def open_store(settings: Settings | None = None) -> Engine:
    """Create the data directory and migrate its database to head; return the engine."""
    settings = settings or load_settings()
    settings.ensure_dirs()
    engine = get_engine(settings)
    if current_revision(engine) != head_revision():
        migrate(engine)
    return engine


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One short transaction (``session_scope`` without the per-call schema check)."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextlib.contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session on the migrated store that commits on success and rolls back on error."""
    with transaction(open_store(settings)) as session:
        yield session


# Concurrent writers racing to create the same series (IntegrityError on the unique UID) or
# waiting out a lock: the loser retries its whole, short transaction.
DB_ATTEMPTS = 6


def retrying(fn: Callable[[], object], what: str):
    """``fn()``, run again (up to :data:`DB_ATTEMPTS` times, with a short back-off) when the
    database says it lost a race or timed out; ``fn`` is one whole transaction, rolled back when it
    raised. Shared by the node's store, series completion and file drops."""
    for attempt in range(DB_ATTEMPTS):
        try:
            return fn()
        except (IntegrityError, DBAPIError) as exc:
            # IntegrityError: another thread created the same series/study/subject first; its
            # row is there now, so the retry finds it. DBAPIError: lock time-out or a dropped
            # connection; a retry is the right answer to both.
            if attempt == DB_ATTEMPTS - 1:
                raise
            _LOG.debug("%s: retry %d after %s", what, attempt + 1, type(exc).__name__)
            time.sleep(0.005 * 2 ** attempt)
