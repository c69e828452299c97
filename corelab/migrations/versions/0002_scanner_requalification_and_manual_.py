"""scanner requalification and manual version of QC

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('scanner', schema=None) as batch_op:
        batch_op.add_column(sa.Column('requalification_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True))

    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('qc_manual_version', sqlmodel.sql.sqltypes.AutoString(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('qc_manual_version')

    with op.batch_alter_table('scanner', schema=None) as batch_op:
        batch_op.drop_column('requalification_reason')

