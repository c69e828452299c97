"""series: trial_id, set at ingest; filled for existing series

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

A series' trial was worked out at each use (through its study's visit and subject, or the first
trial for a phantom). It is now stored once, at ingest. Existing series get what ingest would
have set: the trial of the study's visit (the authoritative chain, the one QC, deviations and
reports join through); a phantom series (whose study has no visit) gets the installation's
trial when there is exactly one (ingest's rule when the object names no known trial). Anything
else stays NULL (a series of no trial).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('trial_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_series_trial_id'), ['trial_id'], unique=False)
        batch_op.create_foreign_key('fk_series_trial_id_trial', 'trial', ['trial_id'], ['id'])

    op.execute(sa.text(
        "UPDATE series SET trial_id = (SELECT subject.trial_id FROM study "
        "JOIN visit ON study.visit_id = visit.id JOIN subject ON visit.subject_id = subject.id "
        "WHERE study.id = series.study_id) WHERE trial_id IS NULL"))
    op.execute(sa.text(
        "UPDATE series SET trial_id = (SELECT MIN(id) FROM trial) "
        "WHERE trial_id IS NULL AND kind = 'phantom' AND (SELECT COUNT(*) FROM trial) = 1"))


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_constraint('fk_series_trial_id_trial', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_series_trial_id'))
        batch_op.drop_column('trial_id')
