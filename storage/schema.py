"""The experience-store schema: SQLAlchemy 2.x typed models, one place for every table and column name.

Per-step numbers that RL reads as scalars (reward, done flags, source, latency, chunk reference, policy
version) are first-class columns; per-step vectors (state, executed action, privileged state) are
little-endian float32 blobs, so a step is one row and an episode loads as a handful of contiguous buffers.
Images are compressed, content-addressed blobs shared by every step (and episode) that shows the same frame.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage import limits

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
OUTCOMES = ("success", "failure", "truncated", "error")


def utcnow() -> dt.datetime:
    """The current time in UTC (timezone-aware)."""
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base carrying the constraint naming convention Alembic relies on."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    """A collection or training run (e.g. an MLflow run id) that episodes belong to.

    ``next_episode_index`` is the run's episode counter: each claim takes the current value and increments it
    in one transaction, so concurrent collectors of a run never get the same index (``RunRegistry.claim``).
    """

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(sa.String(limits.RUN_ID.length), primary_key=True)
    name: Mapped[str | None] = mapped_column(sa.String(256))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    next_episode_index: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class PolicyVersion(Base):
    """A registered set of policy weights; every step points at the version that produced its chunk."""

    __tablename__ = "policy_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(sa.String(limits.POLICY_VERSION.length), unique=True)
    kind: Mapped[str] = mapped_column(sa.String(64))
    uri: Mapped[str | None] = mapped_column(sa.Text)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("policy_versions.id"))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class Episode(Base):
    """One finished episode; its steps, chunks, images and interventions hang off ``id``. ``final_observation``
    (NULL unless the episode was truncated and its writer kept it) is the observation after the last step,
    msgpack-numpy bytes (``storage.codec.encode_observation``); deferred, so listing episodes never reads it."""

    __tablename__ = "episodes"
    __table_args__ = (
        sa.CheckConstraint(f"outcome IN {OUTCOMES!r}", name="outcome"),
        sa.Index("ix_episodes_task_outcome", "task", "outcome"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[uuid.UUID] = mapped_column(sa.Uuid, unique=True)
    run_id: Mapped[str | None] = mapped_column(sa.ForeignKey("runs.id"), index=True)
    task: Mapped[str] = mapped_column(sa.String(limits.TASK.length))
    env_id: Mapped[str] = mapped_column(sa.String(limits.ENV_ID.length))
    policy_version_id: Mapped[int | None] = mapped_column(sa.ForeignKey("policy_versions.id"), index=True)
    seed: Mapped[int | None] = mapped_column(sa.BigInteger)
    outcome: Mapped[str] = mapped_column(sa.String(16))
    length: Mapped[int] = mapped_column(sa.Integer)
    total_reward: Mapped[float] = mapped_column(sa.Double)
    human_steps: Mapped[int] = mapped_column(sa.Integer)
    state_dim: Mapped[int] = mapped_column(sa.Integer)
    action_dim: Mapped[int] = mapped_column(sa.Integer)
    privileged_dim: Mapped[int | None] = mapped_column(sa.Integer)
    chunk_horizon: Mapped[int] = mapped_column(sa.Integer)
    error: Mapped[str | None] = mapped_column(sa.Text)
    prompt: Mapped[str | None] = mapped_column(sa.Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    content_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    final_observation: Mapped[bytes | None] = mapped_column(sa.LargeBinary, nullable=True, deferred=True)


class Chunk(Base):
    """A predicted action chunk (H×D float32 blob), numbered within its episode; ``reference`` (same layout,
    NULL for most policies) is the chunk a refining policy started from (RLT: the prior's ``ã``)."""

    __tablename__ = "chunks"

    episode_id: Mapped[int] = mapped_column(
        sa.ForeignKey("episodes.id", ondelete="CASCADE"), primary_key=True
    )
    chunk_index: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    horizon: Mapped[int] = mapped_column(sa.Integer)
    actions: Mapped[bytes] = mapped_column(sa.LargeBinary)
    reference: Mapped[bytes | None] = mapped_column(sa.LargeBinary, nullable=True)


class Step(Base):
    """One environment step: the observation's state, the executed action and its provenance."""

    __tablename__ = "steps"

    episode_id: Mapped[int] = mapped_column(
        sa.ForeignKey("episodes.id", ondelete="CASCADE"), primary_key=True
    )
    t: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    state: Mapped[bytes] = mapped_column(sa.LargeBinary)
    action: Mapped[bytes] = mapped_column(sa.LargeBinary)
    privileged: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    reward: Mapped[float] = mapped_column(sa.Double)
    terminated: Mapped[bool] = mapped_column(sa.Boolean)
    truncated: Mapped[bool] = mapped_column(sa.Boolean)
    source: Mapped[int] = mapped_column(sa.SmallInteger)
    policy_version_id: Mapped[int | None] = mapped_column(sa.ForeignKey("policy_versions.id"))
    chunk_index: Mapped[int | None] = mapped_column(sa.Integer)
    chunk_offset: Mapped[int] = mapped_column(sa.Integer)
    latency_ms: Mapped[float] = mapped_column(sa.Double)
    subtask: Mapped[str | None] = mapped_column(sa.String(limits.SUBTASK.length))
    injected: Mapped[str | None] = mapped_column(sa.String(limits.INJECTED.length))


class Image(Base):
    """A compressed image addressed by the SHA-256 of its raw pixels and shape: identical frames dedupe."""

    __tablename__ = "images"

    hash: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    codec: Mapped[str] = mapped_column(sa.String(16))
    height: Mapped[int] = mapped_column(sa.Integer)
    width: Mapped[int] = mapped_column(sa.Integer)
    channels: Mapped[int] = mapped_column(sa.Integer)
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)


class StepImage(Base):
    """Which image a camera showed at a step."""

    __tablename__ = "step_images"

    episode_id: Mapped[int] = mapped_column(
        sa.ForeignKey("episodes.id", ondelete="CASCADE"), primary_key=True
    )
    t: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    camera: Mapped[str] = mapped_column(sa.String(limits.CAMERA.length), primary_key=True)
    image_hash: Mapped[str] = mapped_column(sa.ForeignKey("images.hash"))


class Intervention(Base):
    """A human takeover segment: steps ``t_start`` (inclusive) to ``t_end`` (exclusive)."""

    __tablename__ = "interventions"

    episode_id: Mapped[int] = mapped_column(
        sa.ForeignKey("episodes.id", ondelete="CASCADE"), primary_key=True
    )
    segment_index: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    t_start: Mapped[int] = mapped_column(sa.Integer)
    t_end: Mapped[int] = mapped_column(sa.Integer)
    trigger: Mapped[str] = mapped_column(sa.String(limits.TRIGGER.length))


class Relabel(Base):
    """One relabel version (never overwritten); ``parent_id`` links it to the relabel it refines."""

    __tablename__ = "relabels"
    __table_args__ = (sa.UniqueConstraint("method", "version", name="uq_relabels_method_version"),)

    id: Mapped[str] = mapped_column(sa.String(limits.RELABEL_ID.length), primary_key=True)
    method: Mapped[str] = mapped_column(sa.String(limits.RELABEL_METHOD.length))
    version: Mapped[int] = mapped_column(sa.Integer)
    parent_id: Mapped[str | None] = mapped_column(sa.ForeignKey("relabels.id"))
    value_model_version: Mapped[str | None] = mapped_column(sa.String(limits.VALUE_MODEL_VERSION.length))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    diagnostics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class RelabelValue(Base):
    """Per-step value, advantage and improvement indicator under one relabel version."""

    __tablename__ = "relabel_values"

    relabel_id: Mapped[str] = mapped_column(
        sa.ForeignKey("relabels.id", ondelete="CASCADE"), primary_key=True
    )
    episode_id: Mapped[int] = mapped_column(
        sa.ForeignKey("episodes.id", ondelete="CASCADE"), primary_key=True
    )
    t: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    value: Mapped[float] = mapped_column(sa.Double)
    advantage: Mapped[float] = mapped_column(sa.Double)
    indicator: Mapped[bool] = mapped_column(sa.Boolean)


class Evaluation(Base):
    """An evaluation of one policy version on one task: ``successes`` out of ``n`` episodes, plus metrics."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    policy_version_id: Mapped[int] = mapped_column(sa.ForeignKey("policy_versions.id"), index=True)
    task: Mapped[str] = mapped_column(sa.String(256))
    n: Mapped[int] = mapped_column(sa.Integer)
    successes: Mapped[int] = mapped_column(sa.Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    run_id: Mapped[str | None] = mapped_column(sa.ForeignKey("runs.id"))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
