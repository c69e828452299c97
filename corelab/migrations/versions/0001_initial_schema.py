"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-21
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0001'
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('auditevent',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('entity', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('entity_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('prev_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('hash'),
    sa.UniqueConstraint('prev_hash')
    )
    with op.batch_alter_table('auditevent', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_auditevent_action'), ['action'], unique=False)

    op.create_table('site',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('ae_title', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('site', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_site_ae_title'), ['ae_title'], unique=False)
        batch_op.create_index(batch_op.f('ix_site_code'), ['code'], unique=True)

    op.create_table('trial',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('title', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('imaging_manual', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('manual_version', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('standard', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('pseudonym_pattern', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('trial', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_trial_code'), ['code'], unique=True)

    op.create_table('quarantineitem',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=True),
    sa.Column('source_name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('series_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('path', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('reason_code', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('received_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('released_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['site_id'], ['site.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('quarantineitem', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_quarantineitem_reason_code'), ['reason_code'], unique=False)
        batch_op.create_index(batch_op.f('ix_quarantineitem_series_uid'), ['series_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_quarantineitem_site_id'), ['site_id'], unique=False)

    op.create_table('report',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=True),
    sa.Column('trial_id', sa.Integer(), nullable=True),
    sa.Column('path', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('replaces_id', sa.Integer(), nullable=True),
    sa.Column('signed_by', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('signed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['replaces_id'], ['report.id'], ),
    sa.ForeignKeyConstraint(['site_id'], ['site.id'], ),
    sa.ForeignKeyConstraint(['trial_id'], ['trial.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('report', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_report_site_id'), ['site_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_report_trial_id'), ['trial_id'], unique=False)

    op.create_table('scanner',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('manufacturer', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('serial_number', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('software_versions', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('first_seen', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('last_seen', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['site_id'], ['site.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('manufacturer', 'model', 'serial_number')
    )
    with op.batch_alter_table('scanner', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scanner_code'), ['code'], unique=True)
        batch_op.create_index(batch_op.f('ix_scanner_site_id'), ['site_id'], unique=False)

    op.create_table('subject',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('pseudonym', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.ForeignKeyConstraint(['site_id'], ['site.id'], ),
    sa.ForeignKeyConstraint(['trial_id'], ['trial.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('trial_id', 'pseudonym')
    )
    with op.batch_alter_table('subject', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_subject_site_id'), ['site_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_subject_trial_id'), ['trial_id'], unique=False)

    op.create_table('accreditation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('scanner_id', sa.Integer(), nullable=False),
    sa.Column('standard', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('scope_kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('scope', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('valid_from', sa.Date(), nullable=True),
    sa.Column('valid_until', sa.Date(), nullable=True),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['scanner_id'], ['scanner.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('accreditation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_accreditation_scanner_id'), ['scanner_id'], unique=False)

    op.create_table('visit',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject_id', sa.Integer(), nullable=False),
    sa.Column('label', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.ForeignKeyConstraint(['subject_id'], ['subject.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('subject_id', 'label')
    )
    with op.batch_alter_table('visit', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_visit_subject_id'), ['subject_id'], unique=False)

    op.create_table('study',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=True),
    sa.Column('visit_id', sa.Integer(), nullable=True),
    sa.Column('study_date', sa.Date(), nullable=True),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.ForeignKeyConstraint(['site_id'], ['site.id'], ),
    sa.ForeignKeyConstraint(['visit_id'], ['visit.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_site_id'), ['site_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_study_uid'), ['study_uid'], unique=True)
        batch_op.create_index(batch_op.f('ix_study_visit_id'), ['visit_id'], unique=False)

    op.create_table('series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=True),
    sa.Column('site_id', sa.Integer(), nullable=True),
    sa.Column('scanner_id', sa.Integer(), nullable=True),
    sa.Column('modality', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('received_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('completed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('expected_count', sa.Integer(), nullable=True),
    sa.Column('checksum', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('qc_state', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('qc_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('header_row', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['scanner_id'], ['scanner.id'], ),
    sa.ForeignKeyConstraint(['site_id'], ['site.id'], ),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_series_scanner_id'), ['scanner_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_series_uid'), ['series_uid'], unique=True)
        batch_op.create_index(batch_op.f('ix_series_site_id'), ['site_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_study_id'), ['study_id'], unique=False)

    op.create_table('deviation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('rule_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('manual_section', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('manual_version', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('expected', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('observed', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('severity', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('corelab_version', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('series_id', 'rule_id')
    )
    with op.batch_alter_table('deviation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deviation_rule_id'), ['rule_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deviation_series_id'), ['series_id'], unique=False)

    op.create_table('instance',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('sop_class_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('path', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('needs_review', sa.Boolean(), nullable=False),
    sa.Column('received_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid', 'version')
    )
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instance_series_id'), ['series_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_instance_sop_instance_uid'), ['sop_instance_uid'], unique=False)

    op.create_table('phantomresult',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('scanner_id', sa.Integer(), nullable=True),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('standard', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('standard_version', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('verdict', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('fill', sa.JSON(), nullable=False),
    sa.Column('corelab_version', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('input_sha256', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('scan_date', sa.Date(), nullable=True),
    sa.Column('analysed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['scanner_id'], ['scanner.id'], ),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('phantomresult', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_phantomresult_scanner_id'), ['scanner_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_phantomresult_series_id'), ['series_id'], unique=False)

    op.create_table('query',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('deviation_id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('thread', sa.JSON(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['deviation_id'], ['deviation.id'], ),
    sa.ForeignKeyConstraint(['site_id'], ['site.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('query', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_query_deviation_id'), ['deviation_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_query_site_id'), ['site_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('query', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_query_site_id'))
        batch_op.drop_index(batch_op.f('ix_query_deviation_id'))

    op.drop_table('query')
    with op.batch_alter_table('phantomresult', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_phantomresult_series_id'))
        batch_op.drop_index(batch_op.f('ix_phantomresult_scanner_id'))

    op.drop_table('phantomresult')
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instance_sop_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_instance_series_id'))

    op.drop_table('instance')
    with op.batch_alter_table('deviation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deviation_series_id'))
        batch_op.drop_index(batch_op.f('ix_deviation_rule_id'))

    op.drop_table('deviation')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_study_id'))
        batch_op.drop_index(batch_op.f('ix_series_site_id'))
        batch_op.drop_index(batch_op.f('ix_series_series_uid'))
        batch_op.drop_index(batch_op.f('ix_series_scanner_id'))

    op.drop_table('series')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_visit_id'))
        batch_op.drop_index(batch_op.f('ix_study_study_uid'))
        batch_op.drop_index(batch_op.f('ix_study_site_id'))

    op.drop_table('study')
    with op.batch_alter_table('visit', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_visit_subject_id'))

    op.drop_table('visit')
    with op.batch_alter_table('accreditation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_accreditation_scanner_id'))

    op.drop_table('accreditation')
    with op.batch_alter_table('subject', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_subject_trial_id'))
        batch_op.drop_index(batch_op.f('ix_subject_site_id'))

    op.drop_table('subject')
    with op.batch_alter_table('scanner', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_scanner_site_id'))
        batch_op.drop_index(batch_op.f('ix_scanner_code'))

    op.drop_table('scanner')
    with op.batch_alter_table('report', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_report_trial_id'))
        batch_op.drop_index(batch_op.f('ix_report_site_id'))

    op.drop_table('report')
    with op.batch_alter_table('quarantineitem', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_quarantineitem_site_id'))
        batch_op.drop_index(batch_op.f('ix_quarantineitem_series_uid'))
        batch_op.drop_index(batch_op.f('ix_quarantineitem_reason_code'))

    op.drop_table('quarantineitem')
    with op.batch_alter_table('trial', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_trial_code'))

    op.drop_table('trial')
    with op.batch_alter_table('site', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_site_code'))
        batch_op.drop_index(batch_op.f('ix_site_ae_title'))

    op.drop_table('site')
    with op.batch_alter_table('auditevent', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_auditevent_action'))

    op.drop_table('auditevent')
