"""The ``corelab`` command line: one entry point, a subcommand per job.

This module holds ``main()`` and the shared parent parser; the commands live by group in
``flows/cli_admin.py`` (demo, synth, settings, audit), ``flows/cli_series.py`` (register, sites,
ingest, series, quarantine, deviations), ``flows/cli_node.py`` (receive, serve, watch, alerts),
``flows/cli_phantom.py`` (suv, accreditation, phantom) and ``flows/cli_reports.py`` (export,
queries, waivers, reports, sign) and ``flows/cli_users.py`` (user accounts, the portal). Each command parses its arguments, calls one use case in
``services/`` and prints the result; the shared helpers are in ``flows/cli_common.py``.

Every command opens the store first (creating and migrating the data directory on first use).
Commands that a machine may read take ``--json``. Commands that run a pipeline start its Prefect
flow; the others call the use cases directly.
"""

from __future__ import annotations

import argparse
import os
import sys

from flows import cli_admin, cli_archive, cli_node, cli_phantom, cli_reports, cli_series, cli_users
from flows.cli_common import prepare_prefect_env, settings

__all__ = ["build_parser", "main", "prepare_prefect_env"]

COMMAND_GROUPS = (cli_admin, cli_series, cli_node, cli_phantom, cli_reports, cli_users, cli_archive)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # the parent parser of every command that prints
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")

    parser = argparse.ArgumentParser(
        prog="corelab", description="corelab: an imaging core lab for multi-centre PET/CT trials. "
        "Settings come from CORELAB_* environment variables (CORELAB_DATA_DIR, default ./corelab-data).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(sub, common)
    return parser


def _version() -> str:
    from corelab import __version__

    return f"corelab {__version__}"


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input a user can fix: printed as one clear line, exit status 2."""
    from accreditation.evaluate import CentresFileError
    from accreditation.standards import StandardError
    from corelab.dicomio import DicomVolumeError
    from corelab.register import RegisterError
    from corelab.settings import SettingsError
    from expectations.manual import ManualError
    from phantoms.localise import PhantomLocalisationError
    from phantoms.fill import FillSheetError
    from services.lookup import LookupInputError

    return ((SettingsError, RegisterError, ManualError, FillSheetError, StandardError, DicomVolumeError,
            PhantomLocalisationError, FileNotFoundError, CentresFileError, LookupInputError) + cli_reports.user_errors()
            + cli_users.user_errors() + cli_archive.user_errors())


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is not a file (embedded use):
        return False  # then the broken pipe is not stdout's: the error is re-raised, never hidden


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from corelab.db import open_store

    try:
        try:
            open_store(settings())
            return args.func(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
    except _user_errors() as exc:
        print(f"corelab {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # a socket of the command's own (SMTP, an archive): a real failure, not a closed pipe
        # The reader went away (`corelab series list | head -1`): what it wanted it has. Point stdout at
        # devnull so the interpreter's own flush at exit cannot raise again, and end as a process
        # killed by SIGPIPE would (128 + 13), without a traceback (the Python docs' recipe, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
