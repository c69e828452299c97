"""Prefect tasks for receiving: thin wrappers over :mod:`services.intake`."""

from __future__ import annotations

from prefect import task

from corelab.db import session_scope
from corelab.settings import load_settings
from services import intake


@task(name="load-register", task_run_name="load register {path}", retries=2, retry_delay_seconds=[1, 5])
def load_register_file(path: str) -> dict:
    with session_scope(load_settings()) as session:
        return intake.load_register_file(session, path)


@task(name="ingest-drop", task_run_name="ingest {site_code}", retries=2, retry_delay_seconds=[1, 5])
def ingest_drop(path: str, site_code: str) -> dict:
    """Ingest one site's file drop; returns the counts and the quarantine reasons."""
    settings = load_settings()
    with session_scope(settings) as session:
        return intake.ingest_drop(session, settings, path, site_code).as_dict()
