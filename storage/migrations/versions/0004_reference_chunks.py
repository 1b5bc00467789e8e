"""Chunks may carry the chunk a refining policy started from (``chunks.reference``, same layout as ``actions``,
NULL for most policies): RLT stores the prior's reference ``ã`` beside the chunk it executed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 23:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chunks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reference", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chunks", schema=None) as batch_op:
        batch_op.drop_column("reference")
