"""The experience store: episode-atomic, idempotent writes and fast numpy read views (SQLite or PostgreSQL).

Learners and actors only see ``EpisodeRecord`` / numpy arrays; every SQL statement of flywheel lives in
``storage/``. ``ExperienceStore`` is the one public entry point: it checks the schema once and hands each call
to the part that does that job, all sharing one ``Database`` (engines and driver helpers):

- ``migrate.SchemaMigrator``: Alembic upgrades and the schema-head check;
- ``registry.PolicyRegistry`` / ``registry.RunRegistry``: policy versions (id ↔ name cache) and runs;
- ``writes.EpisodeWriter``: validation, hashing and compression first, then one bulk-insert transaction;
- ``images.FrameStore``: content-addressed frames (written by the writer, read by reads and sampling);
- ``reads.EpisodeReader``: the episode index and whole episodes;
- ``transitions.TransitionSampler``: cached replay indexes and N-step sampling;
- ``relabels.RelabelRepository``, ``evaluations.EvaluationRepository``, ``stats.store_stats``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from storage.database import Database
from storage.errors import (
    EpisodeConflictError,
    NotFoundError,
    RunFullError,
    SchemaNotReadyError,
    StoreError,
    UnknownPolicyVersionError,
)
from storage.evaluations import EvaluationRepository, EvaluationSummary
from storage.images import FrameStore
from storage.migrate import SchemaMigrator
from storage.reads import EpisodeReader
from storage.records import EpisodeQuery, EpisodeRecord, EpisodeSummary, Outcome, RelabelRecord
from storage.registry import PolicyRegistry, RunRegistry
from storage.relabels import RelabelRepository
from storage.sampling import ReplayIndex, TransitionBatch
from storage.stats import store_stats
from storage.transitions import TransitionSampler
from storage.writes import EpisodeWriter

__all__ = [
    "EpisodeConflictError",
    "EvaluationSummary",
    "ExperienceStore",
    "NotFoundError",
    "RunFullError",
    "SchemaNotReadyError",
    "StoreError",
    "UnknownPolicyVersionError",
]


class ExperienceStore:
    """Episodes, steps, chunks, images, relabels and evaluations in one SQL database.

    ``url`` is a SQLAlchemy URL: ``sqlite:///path.db`` (default backend; WAL, busy timeout, foreign keys) or
    ``postgresql+psycopg://user@host:port/db``. Call ``upgrade()`` once to create or migrate the schema.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._db = Database(url)
        self._schema = SchemaMigrator(self._db)
        self._policies = PolicyRegistry(self._db)
        self._runs = RunRegistry(self._db)
        self._frames = FrameStore(self._db)
        self._writer = EpisodeWriter(self._db, self._policies, self._runs, self._frames)
        self._reader = EpisodeReader(self._db, self._policies, self._frames)
        self._sampler = TransitionSampler(self._db, self._frames)
        self._relabels = RelabelRepository(self._db)
        self._evaluations = EvaluationRepository(self._db, self._policies, self._runs)

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden (for messages)."""
        return self._db.safe_url()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._db.dialect

    def close(self) -> None:
        """Release pooled connections."""
        self._writer.close()
        self._db.close()

    # ---- schema ----

    def upgrade(self, revision: str = "head") -> None:
        """Create or migrate the schema to ``revision`` (Alembic, bundled migrations); safe to repeat."""
        self._schema.upgrade(revision)

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None for an empty database)."""
        return self._schema.current()

    def head_revision(self) -> str:
        """The newest revision the bundled migrations know."""
        return self._schema.head()

    # ---- registry ----

    def register_policy_version(
        self,
        version: str,
        kind: str,
        uri: str | None = None,
        parent: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        """Register policy weights under ``version`` (idempotent: an existing version is returned unchanged).

        ``parent`` must be a registered version. Returns the version's row id.
        """
        self._schema.require()
        return self._policies.register(version, kind, uri, parent, metadata)

    def policy_versions(self, uri_prefix: str | None = None) -> list[dict[str, Any]]:
        """Registered policy versions, oldest first; ``uri_prefix`` keeps those whose ``uri`` starts with it
        (the checkpoints saved under a folder)."""
        self._schema.require()
        return self._policies.versions(uri_prefix)

    def policy_version(self, version: str) -> dict[str, Any] | None:
        """The registered ``version`` (keys as in ``policy_versions``), or None if it is not registered."""
        self._schema.require()
        return self._policies.version(version)

    def register_run(
        self, run_id: str, name: str | None = None, config: dict[str, Any] | None = None
    ) -> None:
        """Record a run (idempotent). Episodes naming an unknown run create it implicitly."""
        self._schema.require()
        self._runs.register(run_id, name, config)

    def list_runs(self, prefix: str | None = None) -> list[dict[str, Any]]:
        """Recorded runs (id, name, config, created_at), oldest first; ``prefix`` filters on the id."""
        self._schema.require()
        return self._runs.runs(prefix)

    # ---- episodes ----

    def write_episode(self, record: EpisodeRecord, *, max_run_episodes: int | None = None) -> bool:
        """Store ``record`` atomically; True if inserted, False if the identical episode was already stored.

        Raises ``EpisodeValidationError`` (bad fields, unknown policy version) or ``EpisodeConflictError``
        (same UUID, different content); in both cases nothing is written. With ``max_run_episodes`` the write
        also holds a run's target across concurrent writers: ``RunFullError`` (nothing written) when the
        record's run already has that many episodes.
        """
        self._schema.require()
        return self._writer.write(record, max_run_episodes)

    def claim_episode_index(self, run_id: str) -> int:
        """The next never-used episode index of run ``run_id`` (0, 1, …; the run is created if needed).

        Atomic across processes and backends: no two claims of a run get the same index, and an index whose
        episode never committed is not reissued (a run's indices may have gaps).
        """
        self._schema.require()
        return self._runs.claim_episode_index(run_id)

    def list_episodes(
        self,
        task: str | None = None,
        outcome: Outcome | str | None = None,
        policy_version: str | None = None,
        run_id: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[EpisodeSummary]:
        """Episodes matching every given filter, oldest first (at most ``limit``; ``newest_first`` reverses)."""
        self._schema.require()
        query = EpisodeQuery.of(task, outcome, policy_version, run_id)
        return self._reader.list(query, limit, newest_first)

    def find_episodes(
        self, query: EpisodeQuery, limit: int | None = None, newest_first: bool = False
    ) -> list[EpisodeSummary]:
        """Episodes ``query`` matches (any of each filter's values), oldest first (at most ``limit``)."""
        self._schema.require()
        return self._reader.list(query, limit, newest_first)

    def count_episodes(
        self,
        task: str | None = None,
        outcome: Outcome | str | None = None,
        policy_version: str | None = None,
        run_id: str | None = None,
    ) -> int:
        """Number of episodes matching the filters."""
        self._schema.require()
        return self._reader.count(EpisodeQuery.of(task, outcome, policy_version, run_id))

    def count_steps(
        self,
        task: str | None = None,
        outcome: Outcome | str | None = None,
        policy_version: str | None = None,
        run_id: str | None = None,
    ) -> int:
        """Total env steps (episode lengths) of the episodes matching the filters, summed in SQL."""
        self._schema.require()
        return self._reader.count_steps(EpisodeQuery.of(task, outcome, policy_version, run_id))

    def injected_fractions(
        self,
        task: str | None = None,
        outcome: Outcome | str | None = None,
        policy_version: str | None = None,
        run_id: str | None = None,
    ) -> dict[uuid.UUID, float]:
        """Ground truth at a glance: per matching episode, the fraction of its steps an env wrapper injected a
        bad segment into (``EpisodeRecord.injected`` not None), counted in SQL."""
        self._schema.require()
        return self._reader.injected_fractions(EpisodeQuery.of(task, outcome, policy_version, run_id))

    def load_episode(self, episode_uuid: uuid.UUID | str, images: bool = True) -> EpisodeRecord:
        """The stored episode as an ``EpisodeRecord`` of numpy arrays (images decoded if ``images``)."""
        self._schema.require()
        return self._reader.load(uuid.UUID(str(episode_uuid)), images)

    def iter_episodes(
        self,
        task: str | None = None,
        outcome: Outcome | str | None = None,
        policy_version: str | None = None,
        run_id: str | None = None,
        limit: int | None = None,
        images: bool = False,
    ) -> Iterator[EpisodeRecord]:
        """Load matching episodes one at a time, oldest first."""
        for summary in self.list_episodes(task, outcome, policy_version, run_id, limit):
            yield self.load_episode(summary.uuid, images=images)

    def frame_shapes(
        self, episode_uuids: list[uuid.UUID | str]
    ) -> dict[uuid.UUID, dict[str, tuple[int, int]]]:
        """Camera → frame (height, width) of each given episode, read without loading a frame; episodes that
        recorded no images are left out."""
        self._schema.require()
        return self._frames.frame_shapes([uuid.UUID(str(episode)) for episode in episode_uuids])

    # ---- sampling ----

    def sample_transitions(
        self,
        batch_size: int,
        rng: np.random.Generator,
        n_step: int = 1,
        task: str | None = None,
        outcome: Outcome | str | None = None,
        policy_version: str | None = None,
        run_id: str | None = None,
        images: bool = False,
        refresh: bool = True,
    ) -> TransitionBatch:
        """Uniformly sample ``batch_size`` steps and the ``n_step`` window starting at each.

        Windows never cross an episode boundary: steps past the end are masked out (``mask``) and
        ``next_states`` is only valid where ``has_next``. Non-image arrays of matching episodes are cached in
        memory (episodes are immutable); newly stored episodes are added on each call unless ``refresh`` is
        False (then sampling is pure numpy once the index exists). With ``images`` the frames at ``t`` and
        ``t + n_step`` are fetched from the database for the sampled steps only.
        """
        self._schema.require()
        query = EpisodeQuery.of(task, outcome, policy_version, run_id)
        return self._sampler.sample(query, batch_size, rng, n_step, images, refresh)

    def replay(
        self,
        task: str | None = None,
        outcome: Outcome | str | None = None,
        policy_version: str | None = None,
        run_id: str | None = None,
        refresh: bool = True,
    ) -> ReplayIndex:
        """The in-memory index of all matching episodes' step arrays (with newly stored ones if ``refresh``)."""
        self._schema.require()
        return self._sampler.replay(EpisodeQuery.of(task, outcome, policy_version, run_id), refresh)

    # ---- relabels ----

    def write_relabel(self, record: RelabelRecord) -> str:
        """Store a new relabel version and return its id; existing relabels are never modified.

        Every labelled episode must be stored and its label arrays must have the episode's length. The version
        number counts relabels of the same ``method`` (1, 2, …).
        """
        self._schema.require()
        return self._relabels.write(record)

    def load_relabel(self, relabel_id: str) -> RelabelRecord:
        """A stored relabel version with all its per-episode labels."""
        self._schema.require()
        return self._relabels.load(relabel_id)

    def list_relabels(self, method: str | None = None) -> list[RelabelRecord]:
        """Relabel versions (without labels), oldest first; ``method`` filters."""
        self._schema.require()
        return self._relabels.list(method)

    # ---- evaluations ----

    def write_evaluation(
        self,
        policy_version: str,
        task: str,
        n: int,
        successes: int,
        metrics: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> int:
        """Record ``successes`` of ``n`` episodes of ``policy_version`` on ``task``; returns the row id.

        Non-finite metric values (NaN, ±inf, at any depth) are stored as null and read back as ``None``.
        """
        self._schema.require()
        return self._evaluations.write(policy_version, task, n, successes, metrics, run_id)

    def list_evaluations(
        self, policy_version: str | None = None, task: str | None = None
    ) -> list[EvaluationSummary]:
        """Stored evaluations, oldest first, optionally filtered."""
        self._schema.require()
        return self._evaluations.list(policy_version, task)

    # ---- stats ----

    def stats(self) -> dict[str, Any]:
        """Counts for a dashboard: episodes (by task and outcome), steps, images and bytes, relabels, …"""
        self._schema.require()
        return {**store_stats(self._db), "schema_revision": self.schema_revision(), "backend": self.dialect}
