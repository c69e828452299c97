"""receiver: series completeness and arrival time, instance slice position, trial de-identification policy

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.add_column(sa.Column('slice_position_mm', sa.Float(), nullable=True))

    with op.batch_alter_table('trial', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deid_policy', sa.JSON(), server_default='{}', nullable=False))

    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_received_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('completeness', sa.JSON(), server_default='{}', nullable=False))
        batch_op.create_index(batch_op.f('ix_series_last_received_at'), ['last_received_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_last_received_at'))
        batch_op.drop_column('completeness')
        batch_op.drop_column('last_received_at')

    with op.batch_alter_table('trial', schema=None) as batch_op:
        batch_op.drop_column('deid_policy')

    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_column('slice_position_mm')

