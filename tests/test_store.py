"""The store on SQLite and PostgreSQL, built by migrations only."""

from __future__ import annotations

from datetime import date

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import Session, SQLModel, select

from corelab import audit
from corelab.db import current_revision, head_revision, open_store, session_scope
from corelab.models import (Accreditation, AuditEvent, Deviation, Instance, Scanner, Series, Site, Study,
                            Subject, Trial, Visit)

EXPECTED_TABLES = {"trial", "site", "scanner", "accreditation", "subject", "visit", "study", "series",
                   "instance", "phantomresult", "deviation", "query", "report", "auditevent",
                   "quarantineitem", "alembic_version"}


def test_open_store_creates_data_dir_and_migrates(store_settings):
    engine = open_store(store_settings)
    assert store_settings.spool_dir.is_dir() and store_settings.quarantine_dir.is_dir()
    assert store_settings.outbox_dir.is_dir() and store_settings.reports_dir.is_dir()
    assert current_revision(engine) == head_revision()
    assert EXPECTED_TABLES <= set(sa.inspect(engine).get_table_names())
    if store_settings.database_path:
        assert store_settings.database_path.is_file()
        assert store_settings.database_path.parent == store_settings.data_dir.absolute()


def test_migrations_match_models(store_settings):
    """The migrated schema is exactly the models: no drift between models and migrations."""
    engine = open_store(store_settings)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                SQLModel.metadata)
    assert diff == []


def test_open_store_is_idempotent(store_settings):
    open_store(store_settings)
    engine = open_store(store_settings)
    assert current_revision(engine) == head_revision()


def _populate(session: Session) -> Series:
    trial = Trial(code="T1", standard="EARL1")
    site = Site(code="A01", ae_title="SITE_A01")
    session.add_all([trial, site])
    session.flush()
    scanner = Scanner(site_id=site.id, code="A01-1", manufacturer="SIEMENS", model="Biograph Vision 600",
                      serial_number="1234", software_versions="VG80")
    subject = Subject(trial_id=trial.id, site_id=site.id, pseudonym="T1-A01-001")
    session.add_all([scanner, subject])
    session.flush()
    visit = Visit(subject_id=subject.id, label="baseline")
    session.add(visit)
    session.flush()
    study = Study(study_uid="1.2.3", site_id=site.id, visit_id=visit.id, study_date=date(2031, 1, 2))
    session.add(study)
    session.flush()
    series = Series(series_uid="1.2.3.4", study_id=study.id, site_id=site.id, scanner_id=scanner.id,
                    modality="PT", kind="trial", header_row={"uptake_min": 61.5})
    session.add(series)
    session.flush()
    session.add(Instance(series_id=series.id, sop_instance_uid="1.2.3.4.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.128",
                         path="spool/x.dcm", sha256="0" * 64, size_bytes=10))
    session.add(Accreditation(scanner_id=scanner.id, standard="EARL1", scope="T1", status="accredited",
                              valid_from=date(2031, 1, 1), evidence=[1]))
    return series


def test_domain_round_trip(store_settings):
    with session_scope(store_settings) as session:
        series = _populate(session)
        series_id = series.id
    with session_scope(store_settings) as session:
        got = session.get(Series, series_id)
        assert got.header_row == {"uptake_min": 61.5}
        assert got.received_at.tzinfo is not None  # aware UTC on both backends
        acc = session.exec(select(Accreditation)).one()
        assert acc.evidence == [1] and acc.valid_from == date(2031, 1, 1)


def test_deviation_unique_per_series_and_rule(store_settings):
    with session_scope(store_settings) as session:
        series_id = _populate(session).id
        session.add(Deviation(series_id=series_id, rule_id="uptake_window", severity="major"))
    with pytest.raises(sa.exc.IntegrityError):
        with session_scope(store_settings) as session:
            session.add(Deviation(series_id=series_id, rule_id="uptake_window", severity="major"))


def test_foreign_keys_enforced(store_settings):
    with pytest.raises(sa.exc.IntegrityError):
        with session_scope(store_settings) as session:
            session.add(Series(series_uid="9.9", site_id=424242))


def test_audit_chain_detects_edit_and_delete(store_settings):
    engine = open_store(store_settings)
    with Session(engine) as session:
        for i in range(4):
            audit.append(session, actor="physicist", action="test", entity="series", entity_id=i, detail={"i": i})
        session.commit()
        assert audit.verify(session) == []
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE auditevent SET actor = 'mallory' WHERE id = 2"))
    with Session(engine) as session:
        problems = audit.verify(session)
        assert [p.event_id for p in problems] == [2]
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE auditevent SET actor = 'physicist' WHERE id = 2"))
        conn.execute(sa.text("DELETE FROM auditevent WHERE id = 3"))
    with Session(engine) as session:
        problems = audit.verify(session)
        assert [p.event_id for p in problems] == [4]
        assert "link broken" in problems[0].problem


def test_audit_chain_cannot_fork(store_settings):
    engine = open_store(store_settings)
    with Session(engine) as session:
        first = audit.append(session, actor="a", action="x")
        session.commit()
        session.add(AuditEvent(actor="b", action="y", prev_hash=first.prev_hash, hash="f" * 64))
        with pytest.raises(sa.exc.IntegrityError):
            session.commit()


def test_an_old_store_is_upgraded_in_place_keeping_its_data(store_settings):
    """A data directory made by an older corelab is brought to head by the next command."""
    from corelab.db import get_engine, migrate

    store_settings.ensure_dirs()
    engine = get_engine(store_settings)
    migrate(engine, "0001")
    assert current_revision(engine) == "0001"
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO site (code, name, ae_title, created_at) "
                             "VALUES ('OLD', '', 'OLD_AE', '2030-01-01 00:00:00')"))
    open_store(store_settings)
    assert current_revision(engine) == head_revision() != "0001"
    with session_scope(store_settings) as session:
        assert session.exec(select(Site).where(Site.code == "OLD")).one().ae_title == "OLD_AE"
