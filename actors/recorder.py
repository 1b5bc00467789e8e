"""Accumulates one episode's steps and chunks into a columnar ``EpisodeRecord``.

Subtasks (Hi-Robot / π0.5) are recorded per step with their provenance: ``policy`` (a hierarchical policy's high
level named it), ``human`` (an intervening human corrected it) or ``expert_phase`` (derived from the scripted
expert). The store has one ``subtask`` column; provenance travels in the episode metadata as run-length
segments under ``subtask_sources`` (``[{"source", "t_start", "t_end"}]``, ``t_end`` exclusive), read back per step
with :func:`subtask_sources`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.base import Observation
from storage.records import EpisodeRecord, InterventionSegment, Outcome, StepSource

SUBTASK_POLICY, SUBTASK_HUMAN, SUBTASK_EXPERT = "policy", "human", "expert_phase"
SUBTASK_SOURCES_KEY = "subtask_sources"
#: Per-step 0/1 hand-off flags of a refining policy's episode (RLT's critical phase), in the episode metadata.
CRITICAL_PHASE_KEY = "critical_phase"


@dataclass
class EpisodeRecorder:
    """Collects what happens in one episode, step by step, and turns it into an ``EpisodeRecord``.

    ``add_chunk`` registers a predicted chunk and returns its id; ``add_step`` records the observation the
    action was chosen from, the executed action and its provenance. ``finish`` closes the episode. ``prompt`` is
    the instruction the episode ran under (stored as ``EpisodeRecord.prompt``). A chunk of a refining policy
    (RLT) also brings the chunk it started from (stored as ``EpisodeRecord.reference_chunks``) and its
    hand-off flag (stored per step as ``metadata["critical_phase"]``, 0/1; a human step takes its chunk's, or
    the latest chunk's); ``policy_version`` names the episode's policy when its steps name several (default:
    the first step's). ``finish`` of a truncated episode keeps the observation after its last step
    (``EpisodeRecord.final_observation``) as its steps' observations are kept. With ``record_embeddings`` each
    chunk's ``embeddings`` (the policy's, ``T×E``) are kept too (``EpisodeRecord.chunk_embeddings``, in memory
    only; none when a chunk came without them).
    """

    task: str
    env_id: str
    seed: int | None
    run_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    record_images: bool = True
    episode_uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    prompt: str | None = None
    policy_version: str | None = None
    record_embeddings: bool = False
    _states: list[np.ndarray] = field(default_factory=list)
    _privileged: list[np.ndarray] = field(default_factory=list)
    _images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _actions: list[np.ndarray] = field(default_factory=list)
    _rewards: list[float] = field(default_factory=list)
    _terminated: list[bool] = field(default_factory=list)
    _truncated: list[bool] = field(default_factory=list)
    _sources: list[int] = field(default_factory=list)
    _versions: list[str | None] = field(default_factory=list)
    _chunk_ids: list[int] = field(default_factory=list)
    _chunk_offsets: list[int] = field(default_factory=list)
    _latency_ms: list[float] = field(default_factory=list)
    _chunks: list[np.ndarray] = field(default_factory=list)
    _chunk_subtasks: list[str | None] = field(default_factory=list)
    _references: list[np.ndarray | None] = field(default_factory=list)
    _chunk_critical: list[bool | None] = field(default_factory=list)
    _embeddings: list[np.ndarray | None] = field(default_factory=list)
    _critical: list[bool | None] = field(default_factory=list)
    _subtasks: list[str | None] = field(default_factory=list)
    _subtask_sources: list[str | None] = field(default_factory=list)
    _injected: list[str | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Steps recorded so far."""
        return len(self._actions)

    def add_chunk(
        self,
        actions: np.ndarray,
        subtask: str | None = None,
        reference: np.ndarray | None = None,
        critical: bool | None = None,
        embeddings: np.ndarray | None = None,
    ) -> int:
        """Register a predicted ``H×D`` chunk (the subtask it was conditioned on, the reference it refines, its
        hand-off flag and the policy's embeddings, if any); returns its index."""
        self._chunks.append(np.asarray(actions, dtype=np.float32))
        self._chunk_subtasks.append(subtask)
        self._references.append(None if reference is None else np.asarray(reference, dtype=np.float32))
        self._chunk_critical.append(None if critical is None else bool(critical))
        kept = self.record_embeddings and embeddings is not None
        self._embeddings.append(np.array(embeddings, dtype=np.float32) if kept else None)
        return len(self._chunks) - 1

    def chunk_subtask(self, chunk_id: int) -> str | None:
        """The subtask chunk ``chunk_id`` was conditioned on (None for ``-1`` or an unconditioned chunk)."""
        return self._chunk_subtasks[chunk_id] if chunk_id >= 0 else None

    def add_step(
        self,
        observation: Observation,
        executed_action: np.ndarray,
        reward: float,
        terminated: bool,
        truncated: bool,
        *,
        source: StepSource,
        policy_version: str | None,
        chunk_id: int,
        chunk_offset: int,
        latency_ms: float,
        subtask: str | None = None,
        subtask_source: str | None = None,
        injected: str | None = None,
    ) -> None:
        """Record one step: the observation the action was chosen from and what happened.

        ``subtask`` / ``subtask_source`` label the step's subtask and who named it (``policy``, ``human``);
        ``injected`` the kind of bad segment an env wrapper ran instead of the policy's action (ground truth,
        ``envs.injection``), None on a clean step.
        """
        if (subtask is None) != (subtask_source is None):
            raise ValueError(
                f"subtask_source: expected a source exactly when a subtask is given, got {subtask!r}, "
                f"{subtask_source!r}"
            )
        self._states.append(np.asarray(observation["state"], dtype=np.float32))
        if "privileged" in observation:
            self._privileged.append(np.asarray(observation["privileged"], dtype=np.float32))
        if self.record_images:
            for camera, image in observation["images"].items():
                self._images.setdefault(camera, []).append(image)
        self._actions.append(np.asarray(executed_action, dtype=np.float32))
        self._rewards.append(float(reward))
        self._terminated.append(bool(terminated))
        self._truncated.append(bool(truncated))
        self._sources.append(int(source))
        self._versions.append(policy_version)
        self._chunk_ids.append(chunk_id)
        self._chunk_offsets.append(chunk_offset)
        self._latency_ms.append(float(latency_ms))
        self._subtasks.append(subtask)
        self._subtask_sources.append(subtask_source)
        self._injected.append(injected)
        flags = self._chunk_critical
        self._critical.append(flags[chunk_id] if chunk_id >= 0 else flags[-1] if flags else None)

    def finish(
        self,
        outcome: Outcome,
        interventions: list[InterventionSegment] | None = None,
        error: str | None = None,
        final_observation: Observation | None = None,
    ) -> EpisodeRecord:
        """Close the episode and return its record (the recorder should not be used afterwards).

        ``final_observation`` is the observation after the last step; it is kept for a ``TRUNCATED`` episode
        only (the one a learner bootstraps from)."""
        return self._record(outcome, interventions, error, final_observation, self._chunk_embeddings())

    def _record(
        self,
        outcome: Outcome,
        interventions: list[InterventionSegment] | None,
        error: str | None,
        final_observation: Observation | None,
        chunk_embeddings: np.ndarray | None,
    ) -> EpisodeRecord:
        """The record of the steps so far (``finish``)."""
        action_dim = self._actions[0].shape[0] if self._actions else 0
        horizon = self._chunks[0].shape[0] if self._chunks else 1
        versions = [v for v in self._versions if v is not None]
        labelled = any(s is not None for s in self._subtasks)
        metadata = dict(self.metadata)
        if labelled:
            metadata[SUBTASK_SOURCES_KEY] = source_segments(self._subtask_sources)
        if any(flag is not None for flag in self._critical):
            metadata[CRITICAL_PHASE_KEY] = [int(bool(flag)) for flag in self._critical]
        return EpisodeRecord(
            uuid=self.episode_uuid,
            task=self.task,
            env_id=self.env_id,
            policy_version=self.policy_version or (versions[0] if versions else None),
            seed=self.seed,
            outcome=outcome,
            states=_stack(self._states, np.float32),
            actions=_stack(self._actions, np.float32, (0, action_dim)),
            rewards=np.asarray(self._rewards, dtype=np.float32),
            terminated=np.asarray(self._terminated, dtype=bool),
            truncated=np.asarray(self._truncated, dtype=bool),
            sources=np.asarray(self._sources, dtype=np.uint8),
            policy_versions=list(self._versions),
            chunk_ids=np.asarray(self._chunk_ids, dtype=np.int32),
            chunk_offsets=np.asarray(self._chunk_offsets, dtype=np.int32),
            latency_ms=np.asarray(self._latency_ms, dtype=np.float32),
            chunks=_stack(self._chunks, np.float32, (0, horizon, action_dim)),
            images={camera: np.stack(frames) for camera, frames in self._images.items()},
            privileged=_stack(self._privileged, np.float32) if self._privileged else None,
            interventions=list(interventions or []),
            metadata=metadata,
            run_id=self.run_id,
            error=error,
            subtasks=list(self._subtasks) if labelled else None,
            prompt=self.prompt,
            injected=list(self._injected) if any(k is not None for k in self._injected) else None,
            reference_chunks=self._reference_chunks(),
            chunk_embeddings=chunk_embeddings,
            final_observation=(
                self._kept(final_observation)
                if outcome == Outcome.TRUNCATED and final_observation is not None
                else None
            ),
        )

    def _kept(self, observation: Observation) -> Observation:
        """What the record keeps of an observation: as ``add_step`` keeps a step's (state, privileged when the
        steps have it, frames when recording images) and its prompt."""
        kept = Observation(
            images=dict(observation["images"]) if self.record_images else {},
            state=np.asarray(observation["state"], dtype=np.float32),
            prompt=str(observation.get("prompt", self.prompt or "")),
        )
        if self._privileged and "privileged" in observation:
            kept["privileged"] = np.asarray(observation["privileged"], dtype=np.float32)
        return kept

    def _reference_chunks(self) -> np.ndarray | None:
        """The chunks' references (a chunk without one: itself), or None when no chunk has one."""
        if all(reference is None for reference in self._references):
            return None
        rows = [c if r is None else r for c, r in zip(self._chunks, self._references, strict=True)]
        return np.stack(rows).astype(np.float32, copy=False)

    def _chunk_embeddings(self) -> np.ndarray | None:
        """Every chunk's embeddings stacked ``K×T×E``, or None unless each chunk brought them."""
        if not self._embeddings or any(kept is None for kept in self._embeddings):
            return None
        return np.stack(self._embeddings)

    def truncated_snapshot(self, error: str) -> EpisodeRecord:
        """The episode so far as an ``error`` episode truncated at its last step (the recorder stays usable; a
        journal snapshot, so without embeddings, which no journal keeps)."""
        record = self._record(Outcome.ERROR, None, error, None, None)
        record.truncated[-1] = True
        return record


def _stack(rows: list[np.ndarray], dtype: type, empty_shape: tuple[int, ...] = (0, 0)) -> np.ndarray:
    """Stack per-step rows, or an empty array of ``empty_shape`` when the episode has none."""
    if not rows:
        return np.zeros(empty_shape, dtype=dtype)
    return np.stack(rows).astype(dtype, copy=False)


def source_segments(sources: list[str | None]) -> list[dict[str, object]]:
    """Run-length segments ``{"source", "t_start", "t_end"}`` of per-step sources (``None`` runs left out)."""
    segments: list[dict[str, object]] = []
    for t, source in enumerate(sources):
        if segments and segments[-1]["source"] == source and segments[-1]["t_end"] == t:
            segments[-1]["t_end"] = t + 1
        elif source is not None:
            segments.append({"source": source, "t_start": t, "t_end": t + 1})
    return segments


def subtask_sources(record: EpisodeRecord) -> list[str | None]:
    """Per-step provenance of ``record.subtasks`` (``policy``, ``human``, ``expert_phase``; None where unlabelled).

    Reads the ``subtask_sources`` segments of the episode metadata, or a whole-episode ``subtask_source``.
    """
    sources: list[str | None] = [None] * record.length
    if record.subtasks is None:
        return sources
    segments = record.metadata.get(SUBTASK_SOURCES_KEY)
    if segments is None:
        whole = record.metadata.get("subtask_source")
        return [whole if s is not None else None for s in record.subtasks]
    for segment in segments:
        for t in range(int(segment["t_start"]), min(int(segment["t_end"]), record.length)):
            sources[t] = str(segment["source"])
    return sources
