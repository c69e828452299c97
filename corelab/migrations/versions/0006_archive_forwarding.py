"""archive forwarding: a trial's archive destination and the per-instance delivery records

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'archivedestination',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('trial_id', sa.Integer(), nullable=False),
        sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('ae_title', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column('port', sa.Integer(), nullable=True),
        sa.Column('url', sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=False),
        sa.Column('username', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column('password_file', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('rule', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('active', sa.Boolean(), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['trial_id'], ['trial.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_archivedestination_active'), 'archivedestination', ['active'], unique=False)
    op.create_index(op.f('ix_archivedestination_trial_id'), 'archivedestination', ['trial_id'], unique=False)
    op.create_table(
        'archivedelivery',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('destination_id', sa.Integer(), nullable=False),
        sa.Column('instance_id', sa.Integer(), nullable=False),
        sa.Column('series_id', sa.Integer(), nullable=False),
        sa.Column('sop_instance_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.Text(), server_default='', nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('last_attempt_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('sent_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['destination_id'], ['archivedestination.id']),
        sa.ForeignKeyConstraint(['instance_id'], ['instance.id']),
        sa.ForeignKeyConstraint(['series_id'], ['series.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('destination_id', 'instance_id'),
    )
    op.create_index(op.f('ix_archivedelivery_destination_id'), 'archivedelivery', ['destination_id'], unique=False)
    op.create_index(op.f('ix_archivedelivery_instance_id'), 'archivedelivery', ['instance_id'], unique=False)
    op.create_index(op.f('ix_archivedelivery_series_id'), 'archivedelivery', ['series_id'], unique=False)
    op.create_index(op.f('ix_archivedelivery_status'), 'archivedelivery', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_archivedelivery_status'), table_name='archivedelivery')
    op.drop_index(op.f('ix_archivedelivery_series_id'), table_name='archivedelivery')
    op.drop_index(op.f('ix_archivedelivery_instance_id'), table_name='archivedelivery')
    op.drop_index(op.f('ix_archivedelivery_destination_id'), table_name='archivedelivery')
    op.drop_table('archivedelivery')
    op.drop_index(op.f('ix_archivedestination_trial_id'), table_name='archivedestination')
    op.drop_index(op.f('ix_archivedestination_active'), table_name='archivedestination')
    op.drop_table('archivedestination')
