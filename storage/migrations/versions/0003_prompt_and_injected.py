"""Episodes record their language prompt (``episodes.prompt``), so nothing downstream needs a task table; steps
may carry the kind of bad segment an env wrapper injected there (``steps.injected``): a queryable ground truth.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 19:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("episodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prompt", sa.Text(), nullable=True))
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("injected", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_column("injected")
    with op.batch_alter_table("episodes", schema=None) as batch_op:
        batch_op.drop_column("prompt")
