"""Episodes may carry the observation after their last step (``episodes.final_observation``, msgpack-numpy bytes,
NULL for old episodes and for every episode that did not end at a time limit): a learner bootstraps a truncated
episode's last transition from it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 02:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("episodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("final_observation", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("episodes", schema=None) as batch_op:
        batch_op.drop_column("final_observation")
