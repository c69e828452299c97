"""What every ``corelab`` command module shares: output, settings, the Prefect environment.

Imported by ``flows/cli.py`` and each ``flows/cli_*.py`` module; it imports none of them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def print_result(args, data, table_rows=None, columns=None) -> None:
    """JSON with ``--json``; otherwise ``key: value`` lines, or a table of ``columns``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
        return
    if table_rows is None:
        for key, value in (data.items() if isinstance(data, dict) else enumerate(data)):
            print(f"{key}: {value}")
        return
    if not table_rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in table_rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in table_rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def short_uid(uid: str | None, *, keep: int = 14) -> str:
    """A UID cut to its tail for a table (the tail is what differs between series of one
    study); ``--json`` prints it whole for commands that take it."""
    if not uid:
        return ""
    return uid if len(uid) <= keep + 3 else "..." + uid[-keep:]


def utc_text(value) -> str:
    """An aware datetime as ``YYYY-MM-DD HH:MM:SSZ`` (UTC) for a table; other values as they are."""
    from datetime import datetime, timezone

    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return "" if value is None else str(value)


def cli_actor() -> str:
    """Who a command acts as in the audit log: ``cli:<login name>``."""
    import getpass

    return f"cli:{getpass.getuser()}"


def settings():
    from corelab.settings import load_settings

    return load_settings()


def session(settings_=None):
    """A session on the store (the settings in force unless given)."""
    from corelab.db import session_scope

    return session_scope(settings_ if settings_ is not None else settings())


def prepare_prefect_env(settings) -> None:
    """Point Prefect at the data directory unless the user configured Prefect themselves.

    Must run before ``import prefect``: Prefect reads its settings at import.
    """
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home.absolute()))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                          str(settings.prefect_startup_timeout_s))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The machine may have no route out; telemetry would only log a failure.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def log_to_stderr(level: str) -> None:
    import logging

    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom logs every PDU at INFO; its warnings and errors are enough here.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def receiver_options(args) -> dict:
    return dict(watch_inbox=args.watch_inbox, port=args.port, ae_title=args.ae_title,
                max_associations=args.max_associations, bind_address=args.bind, stable_s=args.stable_s,
                tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                tls_key=Path(args.tls_key) if args.tls_key else None,
                tls_ca=Path(args.tls_ca) if args.tls_ca else None)
