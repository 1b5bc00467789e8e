"""Initial schema: runs, policy versions, episodes, steps, chunks, images, interventions, relabels, evals.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 19:57:20.135569
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("codec", sa.String(length=16), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("hash", name=op.f("pk_images")),
    )
    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=256), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["policy_versions.id"], name=op.f("fk_policy_versions_parent_id_policy_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_policy_versions_version")),
    )
    op.create_table(
        "relabels",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.String(length=64), nullable=True),
        sa.Column("value_model_version", sa.String(length=256), nullable=True),
        sa.Column("config", JSON, nullable=False),
        sa.Column("diagnostics", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["parent_id"], ["relabels.id"], name=op.f("fk_relabels_parent_id_relabels")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_relabels")),
        sa.UniqueConstraint("method", "version", name="uq_relabels_method_version"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("config", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_table(
        "episodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.Uuid(), nullable=False),
        sa.Column("run_id", sa.String(length=128), nullable=True),
        sa.Column("task", sa.String(length=256), nullable=False),
        sa.Column("env_id", sa.String(length=256), nullable=False),
        sa.Column("policy_version_id", sa.Integer(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.Column("total_reward", sa.Double(), nullable=False),
        sa.Column("human_steps", sa.Integer(), nullable=False),
        sa.Column("state_dim", sa.Integer(), nullable=False),
        sa.Column("action_dim", sa.Integer(), nullable=False),
        sa.Column("privileged_dim", sa.Integer(), nullable=True),
        sa.Column("chunk_horizon", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "outcome IN ('success', 'failure', 'truncated', 'error')", name=op.f("ck_episodes_outcome")
        ),
        sa.ForeignKeyConstraint(
            ["policy_version_id"],
            ["policy_versions.id"],
            name=op.f("fk_episodes_policy_version_id_policy_versions"),
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_episodes_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_episodes")),
        sa.UniqueConstraint("uuid", name=op.f("uq_episodes_uuid")),
    )
    with op.batch_alter_table("episodes", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_episodes_policy_version_id"), ["policy_version_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_episodes_run_id"), ["run_id"], unique=False)
        batch_op.create_index("ix_episodes_task_outcome", ["task", "outcome"], unique=False)

    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("policy_version_id", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=256), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("successes", sa.Integer(), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("run_id", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["policy_version_id"],
            ["policy_versions.id"],
            name=op.f("fk_evaluations_policy_version_id_policy_versions"),
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_evaluations_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_evaluations_policy_version_id"), ["policy_version_id"], unique=False
        )

    op.create_table(
        "chunks",
        sa.Column("episode_id", sa.Integer(), nullable=False),
        sa.Column("chunk_index", sa.Integer(), nullable=False),
        sa.Column("horizon", sa.Integer(), nullable=False),
        sa.Column("actions", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["episode_id"], ["episodes.id"], name=op.f("fk_chunks_episode_id_episodes"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("episode_id", "chunk_index", name=op.f("pk_chunks")),
    )
    op.create_table(
        "interventions",
        sa.Column("episode_id", sa.Integer(), nullable=False),
        sa.Column("segment_index", sa.Integer(), nullable=False),
        sa.Column("t_start", sa.Integer(), nullable=False),
        sa.Column("t_end", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["episode_id"],
            ["episodes.id"],
            name=op.f("fk_interventions_episode_id_episodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("episode_id", "segment_index", name=op.f("pk_interventions")),
    )
    op.create_table(
        "relabel_values",
        sa.Column("relabel_id", sa.String(length=64), nullable=False),
        sa.Column("episode_id", sa.Integer(), nullable=False),
        sa.Column("t", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("advantage", sa.Double(), nullable=False),
        sa.Column("indicator", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["episode_id"],
            ["episodes.id"],
            name=op.f("fk_relabel_values_episode_id_episodes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["relabel_id"],
            ["relabels.id"],
            name=op.f("fk_relabel_values_relabel_id_relabels"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("relabel_id", "episode_id", "t", name=op.f("pk_relabel_values")),
    )
    op.create_table(
        "step_images",
        sa.Column("episode_id", sa.Integer(), nullable=False),
        sa.Column("t", sa.Integer(), nullable=False),
        sa.Column("camera", sa.String(length=64), nullable=False),
        sa.Column("image_hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["episode_id"],
            ["episodes.id"],
            name=op.f("fk_step_images_episode_id_episodes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["image_hash"], ["images.hash"], name=op.f("fk_step_images_image_hash_images")
        ),
        sa.PrimaryKeyConstraint("episode_id", "t", "camera", name=op.f("pk_step_images")),
    )
    op.create_table(
        "steps",
        sa.Column("episode_id", sa.Integer(), nullable=False),
        sa.Column("t", sa.Integer(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("action", sa.LargeBinary(), nullable=False),
        sa.Column("privileged", sa.LargeBinary(), nullable=True),
        sa.Column("reward", sa.Double(), nullable=False),
        sa.Column("terminated", sa.Boolean(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("source", sa.SmallInteger(), nullable=False),
        sa.Column("policy_version_id", sa.Integer(), nullable=True),
        sa.Column("chunk_index", sa.Integer(), nullable=True),
        sa.Column("chunk_offset", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("subtask", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(
            ["episode_id"], ["episodes.id"], name=op.f("fk_steps_episode_id_episodes"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["policy_version_id"],
            ["policy_versions.id"],
            name=op.f("fk_steps_policy_version_id_policy_versions"),
        ),
        sa.PrimaryKeyConstraint("episode_id", "t", name=op.f("pk_steps")),
    )


def downgrade() -> None:
    op.drop_table("steps")
    op.drop_table("step_images")
    op.drop_table("relabel_values")
    op.drop_table("interventions")
    op.drop_table("chunks")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evaluations_policy_version_id"))

    op.drop_table("evaluations")
    with op.batch_alter_table("episodes", schema=None) as batch_op:
        batch_op.drop_index("ix_episodes_task_outcome")
        batch_op.drop_index(batch_op.f("ix_episodes_run_id"))
        batch_op.drop_index(batch_op.f("ix_episodes_policy_version_id"))

    op.drop_table("episodes")
    op.drop_table("runs")
    op.drop_table("relabels")
    op.drop_table("policy_versions")
    op.drop_table("images")
