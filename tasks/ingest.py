"""Prefect tasks for receiving: thin wrappers over corelab.ingest."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from corelab.db import session_scope
from corelab.ingest import ingest_path
from corelab.register import load_register
from expectations.manual import trial_fields
from corelab.settings import load_settings


@task(name="load-register", task_run_name="load register {path}", retries=2, retry_delay_seconds=[1, 5])
def load_register_file(path: str) -> dict:
    with session_scope(load_settings()) as session:
        return load_register(session, Path(path), trial_fields=trial_fields)


@task(name="ingest-drop", task_run_name="ingest {site_code}", retries=2, retry_delay_seconds=[1, 5])
def ingest_drop(path: str, site_code: str) -> dict:
    """Ingest one site's file drop; returns the counts and the quarantine reasons."""
    settings = load_settings()
    with session_scope(settings) as session:
        return ingest_path(session, settings, Path(path), site_code=site_code).as_dict()
