"""The rollout worker as a plain Python class: steps N envs with a chunking policy and emits finished episodes.

Runs in-process for tests and debugging; ``actors.remote`` makes it a Ray actor without changing it.
A worker asks the policy for a chunk only for envs that need one (see ``actors.execution``: synchronous, naive
async or Real-Time Chunking execution with a simulated inference delay), so chunk requests from several envs share
one batched ``infer`` call. A new policy set with ``set_policy`` takes effect at the next chunk request of each
env: every step records the version of the chunk it came from. ``set_policy`` may be called from another thread
while ``run`` is going (a Ray actor with ``max_concurrency`` > 1 does this).

Episode seeds: with ``claim_episode_index`` (collection into the store: ``actors.sinks.RunEpisodeIndex``), each
episode claims the next never-used index of its run and is seeded with ``episode_seed(run seed, index)``, so a
run's episodes never repeat a seed, whichever process (resumed, concurrent, restarted) runs them; the index is
recorded in the episode metadata (``episode_index``). Without it, seeds come from a stream of ``(seed,
worker_id)`` (reproducible for one worker's life, see ``reseed``).

With a ``journal_dir``, a worker snapshots each open episode at every chunk boundary into a crash-safe journal
(``storage.journal``); a worker rebuilt after its process died commits those snapshots as ``error`` episodes.

A hierarchical policy (one with ``last_subtasks``, e.g. ``policies.hierarchical.HierarchicalPolicy``) also
names each row's subtask; every step records the subtask of its chunk with provenance ``policy``. A human step
records the subtask the intervening device named (``info["subtask"]``) with provenance ``human``.

A per-env policy that declares ``info_keys`` (RLT's actor: the entries its hand-off switch reads, e.g.
``rlt.phase.InfoKeySwitch``) gets with each row those entries of the env info that came with the row's
observation (``reset``'s at an episode's first chunk, else the last step's); policies see observations only.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from actors.execution import ChunkSchedule, ExecutionConfig
from actors.recorder import SUBTASK_HUMAN, SUBTASK_POLICY, EpisodeRecorder
from core.types import InterventionSegment, Outcome, StepSource, episode_outcome
from policies.base import ActionChunk, Observation, PerEnvPolicy, Policy, stack_observations
from policies.rtc import InpaintingTargets, infer_inpainted, supports_inpainting
from storage.errors import EpisodeConflictError, RunFullError
from storage.journal import EpisodeJournal
from storage.records import EpisodeRecord

logger = logging.getLogger(__name__)

TargetUnit = Literal["episodes", "env_steps"]


def target_progress_bar(unit: TargetUnit, total: int, initial: int, progress: bool) -> tqdm:
    """The progress bar of a collection job counting committed ``episodes`` or ``env_steps``."""
    return tqdm(
        total=total,
        initial=initial,
        desc=unit.replace("_", " "),
        unit="ep" if unit == "episodes" else "step",
        disable=not progress,
    )


EpisodeSink = Callable[[EpisodeRecord], Any]
EnvFactory = Callable[[], gym.Env]
EPISODE_INDEX_KEY = "episode_index"


def episode_seed(run_seed: int, index: int) -> int:
    """The env seed of episode ``index`` of a run seeded ``run_seed`` (31 bits, from numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([run_seed, index]).generate_state(1)[0] >> 1)


@dataclass
class RolloutStats:
    """What a worker did in one ``run`` call."""

    episodes: int = 0
    successes: int = 0
    errors: int = 0
    env_steps: int = 0
    human_steps: int = 0
    waiting_steps: int = 0
    inference_calls: int = 0
    seconds: float = 0.0
    episode_uuids: list[str] = field(default_factory=list)

    def merge(self, other: RolloutStats) -> RolloutStats:
        """Sum of two stats (for aggregating workers)."""
        return RolloutStats(
            episodes=self.episodes + other.episodes,
            successes=self.successes + other.successes,
            errors=self.errors + other.errors,
            env_steps=self.env_steps + other.env_steps,
            human_steps=self.human_steps + other.human_steps,
            waiting_steps=self.waiting_steps + other.waiting_steps,
            inference_calls=self.inference_calls + other.inference_calls,
            seconds=max(self.seconds, other.seconds),
            episode_uuids=self.episode_uuids + other.episode_uuids,
        )


@dataclass
class _EnvSlot:
    """One env's live state inside a worker."""

    env: gym.Env
    env_id: str
    task: str
    index: int
    schedule: ChunkSchedule
    observation: Observation | None = None
    info: dict[str, Any] = field(default_factory=dict)
    recorder: EpisodeRecorder | None = None


class RolloutWorker:
    """Steps several envs with one policy and hands each finished episode to ``sink``.

    ``env_factories`` build the envs (one slot each); ``seed`` is the run seed episode seeds derive from;
    ``claim_episode_index`` (optional) claims each new episode's index in its run, which with ``seed`` fixes
    the episode's seed (see the module docstring); a sink that raises ``storage.RunFullError`` ends the
    ``run`` call (the run is complete) and the refused episode is dropped. ``execution`` says how chunks are
    executed (default: synchronously, no delay, the whole chunk). RTC needs a policy that accepts guidance (``policies.rtc.supports_inpainting``);
    with any other policy the worker logs a warning and runs naive async instead. ``journal_dir`` turns on the
    crash journal (``<journal_dir>/worker<worker_id>.sqlite``); building the worker commits what a previous,
    killed incarnation with the same id left there (``recovered_episodes`` says how many). With
    ``record_embeddings`` each record carries the policy's embeddings of its chunks (``chunk_embeddings``, e.g.
    the RLT prior's, so its learner need not re-run the prior; the store does not keep them).
    """

    def __init__(
        self,
        env_factories: list[EnvFactory],
        policy: Policy,
        sink: EpisodeSink,
        *,
        task: str,
        worker_id: int = 0,
        seed: int = 0,
        run_id: str | None = None,
        record_images: bool = True,
        record_embeddings: bool = False,
        execution: ExecutionConfig | None = None,
        episode_metadata: dict[str, Any] | None = None,
        journal_dir: str | None = None,
        claim_episode_index: Callable[[], int] | None = None,
    ) -> None:
        if not env_factories:
            raise ValueError("RolloutWorker needs at least one env factory")
        self.policy = policy
        self.sink = sink
        self.worker_id = worker_id
        self.run_id = run_id
        self.record_images, self.record_embeddings = record_images, record_embeddings
        self.execution = execution or ExecutionConfig()
        self.execution.steps(policy.action_horizon)  # fail fast if s and d do not fit the chunk
        self.episode_metadata = dict(episode_metadata or {})
        self._seed = seed
        self._seeds = np.random.default_rng([seed, worker_id])
        self._claim_index = claim_episode_index
        self._given_seeds: collections.deque[int] = collections.deque()
        self._run_full = False
        self._slots = [
            _EnvSlot(
                env=factory(),
                env_id=f"worker{worker_id}/env{index}",
                task=task,
                index=index,
                schedule=ChunkSchedule(self.execution, policy.action_horizon, policy.action_dim),
            )
            for index, factory in enumerate(env_factories)
        ]
        self._pending_policy: Policy | None = None
        self._policy_lock = threading.Lock()
        self._run_lock = threading.Lock()  # a Ray actor may call close() from a second thread during run()
        self._inpaint = self._check_inpainting(policy)
        # a runtime protocol check costs ~30 µs: done once per policy, not per chunk
        self._per_env = isinstance(policy, PerEnvPolicy)
        self._info_keys = _info_keys(policy)
        self._journal = (
            EpisodeJournal(Path(journal_dir) / f"worker{worker_id}.sqlite") if journal_dir else None
        )
        self.recovered_episodes = self._recover_open_episodes()

    def set_policy(self, policy: Policy) -> None:
        """Switch to a new policy version; each env picks it up at its next chunk boundary."""
        with self._policy_lock:
            self._pending_policy = policy

    def run(
        self,
        *,
        episodes: int | None = None,
        env_steps: int | None = None,
        on_episode: Callable[[EpisodeRecord], None] | None = None,
    ) -> RolloutStats:
        """Collect until ``episodes`` episodes have finished or ``env_steps`` steps were taken (whichever is set).

        Episodes still open when the target is reached stay open and continue at the next ``run`` call; an
        episode is only ever handed to the sink whole.
        """
        if (episodes is None) == (env_steps is None):
            raise ValueError("run() takes exactly one of episodes= or env_steps=")
        with self._run_lock:
            return self._run(episodes, env_steps, on_episode)

    def _run(
        self,
        episodes: int | None,
        env_steps: int | None,
        on_episode: Callable[[EpisodeRecord], None] | None,
    ) -> RolloutStats:
        stats = RolloutStats()
        started = time.perf_counter()
        self._run_full = False
        while not self._run_full and not self._target_reached(stats, episodes, env_steps):
            self._adopt_pending_policy()
            for slot in self._slots:
                if slot.recorder is None:
                    self._start_episode(slot)
            self._refill_chunks(stats)
            for slot in self._slots:
                record = self._step(slot, stats)
                if record is not None:
                    self._emit(record, stats, on_episode)
                    if self._run_full or self._target_reached(stats, episodes, env_steps):
                        break
        stats.seconds = time.perf_counter() - started
        return stats

    def seed_episodes(self, seeds: Iterable[int]) -> None:
        """Seed the next episodes this worker starts with ``seeds``, in order (e.g. fixed evaluation seeds); after
        them, seeds come from the run again."""
        self._given_seeds = collections.deque(int(seed) for seed in seeds)

    def reseed(self, incarnation: int) -> None:
        """Draw episode seeds from a stream of its own for this ``incarnation`` of the worker.

        A worker rebuilt after its process died starts from its constructor arguments again; without a new
        stream it would replay the episode seeds of its first life. (Claimed episode indices need no reseed.)
        """
        self._seeds = np.random.default_rng([self._seed, self.worker_id, incarnation])

    def pid(self) -> int:
        """Process id of the process running this worker."""
        return os.getpid()

    def close(self, timeout_s: float = 20.0) -> None:
        """Close every env; open episodes are abandoned (and dropped from the journal, if any).

        Waits up to ``timeout_s`` for a ``run`` in progress to return, so envs are never closed under it; if it
        does not, nothing is closed (the caller kills the process anyway).
        """
        if not self._run_lock.acquire(timeout=timeout_s):
            logger.warning(
                "worker %d: still running after %.0f s; not closing its envs", self.worker_id, timeout_s
            )
            return
        try:
            for slot in self._slots:
                slot.env.close()
                if self._journal is not None and slot.recorder is not None:
                    self._journal.drop(slot.recorder.episode_uuid)
            if self._journal is not None:
                self._journal.close()
        finally:
            self._run_lock.release()

    def _recover_open_episodes(self) -> int:
        """Commit the snapshots a killed predecessor left in the journal as ``error`` episodes; how many."""
        if self._journal is None:
            return 0
        recovered = 0
        for record in self._journal.open_episodes():
            try:
                self.sink(record)
                recovered += 1
                logger.warning(
                    "worker %d: committed episode %s left open by a dead worker", self.worker_id, record.uuid
                )
            except EpisodeConflictError:  # it was committed whole just before the process died
                logger.info("worker %d: episode %s was already committed whole", self.worker_id, record.uuid)
            except RunFullError:
                logger.info(
                    "worker %d: episode %s left open: its run is complete", self.worker_id, record.uuid
                )
            self._journal.drop(record.uuid)
        return recovered

    @staticmethod
    def _target_reached(stats: RolloutStats, episodes: int | None, env_steps: int | None) -> bool:
        if episodes is not None:
            return stats.episodes >= episodes
        return stats.env_steps >= (env_steps or 0)

    def _start_episode(self, slot: _EnvSlot) -> None:
        metadata = {**self.episode_metadata, **self._execution_metadata()}
        if self._given_seeds:
            seed = self._given_seeds.popleft()
        elif self._claim_index is None:
            seed = int(self._seeds.integers(0, 2**31 - 1))
        else:
            index = self._claim_index()
            seed = episode_seed(self._seed, index)
            metadata[EPISODE_INDEX_KEY] = index
        observation, info = slot.env.reset(seed=seed)
        slot.observation, slot.info = observation, info
        metadata |= env_metadata(slot.env)
        describe = getattr(self.policy, "episode_metadata", None)
        if describe is not None:  # what a policy says about itself (RLT: its mode and weights version)
            metadata |= describe()
        if slot.schedule.horizon != self.policy.action_horizon:
            slot.schedule = ChunkSchedule(self.execution, self.policy.action_horizon, self.policy.action_dim)
        slot.schedule.reset()
        slot.recorder = EpisodeRecorder(
            task=slot.task,
            env_id=slot.env_id,
            seed=seed,
            run_id=self.run_id,
            metadata=metadata,
            record_images=self.record_images,
            record_embeddings=self.record_embeddings,
            prompt=observation.get("prompt"),
        )
        if self._per_env:
            self.policy.reset_env(slot.index)
        else:
            self.policy.reset()

    def _execution_metadata(self) -> dict[str, Any]:
        mode = "naive_async" if self.execution.mode == "rtc" and not self._inpaint else self.execution.mode
        return {
            "execution_mode": mode,
            "inference_delay": self.execution.delay,
            "execute_horizon": self.execution.steps(self.policy.action_horizon),
        }

    def _check_inpainting(self, policy: Policy) -> bool:
        """Whether RTC inpainting runs with ``policy`` (warns once when RTC has to fall back to naive async)."""
        if self.execution.mode != "rtc":
            return False
        if supports_inpainting(policy):
            return True
        logger.warning(
            "policy %s does not accept guidance: RTC falls back to naive async execution", policy.version
        )
        return False

    def _refill_chunks(self, stats: RolloutStats) -> None:
        """One batched ``infer`` for every env that needs a chunk now."""
        self._adopt_pending_policy()
        needy = [slot for slot in self._slots if slot.schedule.needs_chunk()]
        if not needy:
            return
        self._journal_open_episodes(needy)
        batch = stack_observations([slot.observation for slot in needy])
        started = time.perf_counter()
        result = self._infer(batch, needy)
        latency_ms = result.timing.get("infer_ms", (time.perf_counter() - started) * 1e3)
        stats.inference_calls += 1
        subtasks = self._chunk_subtasks(len(needy))
        for index, slot in enumerate(needy):
            chunk = result.actions[index]
            chunk_id = slot.recorder.add_chunk(
                chunk,
                subtask=subtasks[index],
                reference=None if result.reference is None else result.reference[index],
                critical=None if result.critical is None else bool(result.critical[index]),
                embeddings=None if result.embeddings is None else result.embeddings[index],
            )
            version = self.policy.version
            if result.versions is not None:  # the rows name who produced them (RLT: the prior or the learner)
                version, slot.recorder.policy_version = result.versions[index], self.policy.version
            slot.schedule.receive(chunk, chunk_id, version, float(latency_ms))

    def _adopt_pending_policy(self) -> None:
        """Switch to the policy ``set_policy`` left, if any (a per-env policy takes over the old one's env state)."""
        with self._policy_lock:
            pending, self._pending_policy = self._pending_policy, None
        if pending is None:
            return
        self._per_env = isinstance(pending, PerEnvPolicy)
        self._info_keys = _info_keys(pending)
        if self._per_env:
            pending.take_over(self.policy)
        self.policy = pending
        self._inpaint = self._check_inpainting(self.policy)

    def _journal_open_episodes(self, slots: list[_EnvSlot]) -> None:
        """Snapshot each open episode of ``slots`` (at its chunk boundary) as it would be recorded if we died now."""
        if self._journal is None:
            return
        message = (
            f"rollout worker {self.worker_id} (pid {os.getpid()}) died mid-episode; "
            "steps recorded up to its last chunk boundary"
        )
        for slot in slots:
            if slot.recorder.length > 0:
                self._journal.save(slot.recorder.truncated_snapshot(message))

    def _chunk_subtasks(self, rows: int) -> list[str | None]:
        """The subtask a hierarchical policy named for each row of its latest batch (None for flat policies)."""
        subtasks = getattr(self.policy, "last_subtasks", None)
        if subtasks is None:
            return [None] * rows
        if len(subtasks) != rows:
            raise RuntimeError(
                f"policy {self.policy.version}: last_subtasks has {len(subtasks)} rows for a batch of {rows}"
            )
        return list(subtasks)

    def _infer(self, batch: dict, needy: list[_EnvSlot]) -> ActionChunk:
        """Plain sampling, or RTC inpainting toward each env's current chunk when any env has one."""
        if self._inpaint:
            targets, weights = zip(*(slot.schedule.inpainting_target() for slot in needy), strict=True)
            if any(w.any() for w in weights):
                inpainting = InpaintingTargets(np.stack(targets), np.stack(weights), self.execution.beta)
                return infer_inpainted(self.policy, batch, inpainting)
        if self._per_env:
            infos = [{k: slot.info[k] for k in self._info_keys if k in slot.info} for slot in needy]
            return self.policy.infer_envs(
                batch, [slot.index for slot in needy], infos if self._info_keys else None
            )
        return self.policy.infer(batch)

    def _step(self, slot: _EnvSlot, stats: RolloutStats) -> EpisodeRecord | None:
        """Execute one action in one env; returns the finished episode's record, if it finished."""
        scheduled = slot.schedule.next_action()
        try:
            observation, reward, terminated, truncated, info = slot.env.step(scheduled.action)
        except Exception as error:  # an env that raises ends its episode as `error`, the worker goes on
            logger.warning("env %s raised during step: %s", slot.env_id, error)
            return self._finish(
                slot, Outcome.ERROR, error="".join(traceback.format_exception_only(error)).strip()
            )
        source = StepSource(int(info.get("source", StepSource.POLICY)))
        from_policy = source == StepSource.POLICY
        subtask = slot.recorder.chunk_subtask(scheduled.chunk_id) if from_policy else info.get("subtask")
        slot.recorder.add_step(
            slot.observation,
            np.asarray(info.get("executed_action", scheduled.action)),
            float(reward),
            bool(terminated),
            bool(truncated),
            source=source,
            policy_version=scheduled.version if from_policy else None,
            chunk_id=scheduled.chunk_id if from_policy else -1,
            chunk_offset=scheduled.offset if from_policy else -1,
            latency_ms=scheduled.latency_ms if from_policy and scheduled.starts_chunk else 0.0,
            subtask=subtask,
            subtask_source=None if subtask is None else SUBTASK_POLICY if from_policy else SUBTASK_HUMAN,
            injected=info.get("injected"),
        )
        stats.env_steps += 1
        stats.human_steps += int(not from_policy)
        stats.waiting_steps += int(from_policy and scheduled.waiting)
        slot.observation, slot.info = observation, info
        if not from_policy:
            slot.schedule.reset()  # after a human step the policy replans from the new state
        success = bool(info.get("success", False))
        if success or terminated or truncated:
            outcome = episode_outcome(success, bool(terminated), bool(truncated))
            return self._finish(slot, outcome, segments=_intervention_segments(info), final=observation)
        return None

    def _finish(
        self,
        slot: _EnvSlot,
        outcome: Outcome,
        segments: list[InterventionSegment] | None = None,
        error: str | None = None,
        final: Observation | None = None,
    ) -> EpisodeRecord:
        """Close ``slot``'s episode; ``final`` is the observation after its last step (kept if truncated)."""
        record = slot.recorder.finish(outcome, segments, error=error, final_observation=final)
        slot.recorder = None
        return record

    def _emit(
        self,
        record: EpisodeRecord,
        stats: RolloutStats,
        on_episode: Callable[[EpisodeRecord], None] | None,
    ) -> None:
        try:
            self.sink(record)
        except RunFullError as error:  # another process completed the run first
            logger.info("worker %d: %s", self.worker_id, error)
            self._run_full = True
        if self._journal is not None:
            self._journal.drop(record.uuid)
        if self._run_full:
            return
        stats.episodes += 1
        stats.successes += int(record.outcome == Outcome.SUCCESS)
        stats.errors += int(record.outcome == Outcome.ERROR)
        stats.episode_uuids.append(str(record.uuid))
        if on_episode is not None:
            on_episode(record)


def env_metadata(env: gym.Env) -> dict[str, Any]:
    """What an episode records about its env: ``robot_type``, ``fps`` (its control rate) and ``env_spec`` (the
    gymnasium ``EnvSpec`` as JSON data, ``envs.registration``), where the env has them."""
    base = env.unwrapped
    recorded: dict[str, Any] = {}
    if getattr(base, "robot_type", None):
        recorded["robot_type"] = str(base.robot_type)
    if getattr(base, "fps", None):
        recorded["fps"] = float(base.fps)
    # kwargs that are not JSON data: the episode goes without a spec
    with contextlib.suppress(ValueError, TypeError):
        if base.spec is not None:
            recorded["env_spec"] = json.loads(base.spec.to_json())
    return recorded


def _info_keys(policy: Policy) -> tuple[str, ...]:
    """The env info entries a per-env policy reads beside each observation (``PerEnvPolicy``: ``info_keys``)."""
    return tuple(getattr(policy, "info_keys", ()))


def _intervention_segments(info: dict[str, Any]) -> list[InterventionSegment]:
    """Intervention segments reported by the env at episode end (``info["interventions"]``), if any."""
    return [
        InterventionSegment(int(segment["t_start"]), int(segment["t_end"]), str(segment["trigger"]))
        for segment in info.get("interventions", [])
    ]
