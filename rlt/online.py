"""Single-process online RLT: an env, a frozen prior (the VLA), a phase switch and the chunked learner.

Per chunk boundary the prior proposes a chunk (its first ``C`` actions are the reference ``ã``) and returns
its final embeddings; once the ``PhaseSwitch`` fires (latched for the rest of the episode) the learner acts on
``x = (z_rl, proprio)`` and ``ã``. Interventions come from the env (``envs.InterventionWrapper``): a step
whose ``info["source"]`` is ``StepSource.HUMAN`` executed ``info["executed_action"]``; a chunk with any
human step is stored with the executed actions as the action and as ``ã`` (whole chunk or per human step,
``LearnerConfig.human_mask``). Reward is sparse (+1 on ``info["success"]``, which terminates).
With ``LearnerConfig.stride`` < ``C`` the prior is also queried every ``stride`` steps inside critical chunks,
so ``chunk_transitions`` can start a transition there (overlapping chunks, contexts recomputed at each
offset); ``n_step`` bootstraps several chunks later. A loop built with ``token=None`` uses no RL token:
``x`` is the observation's ``OnlineConfig.state_key`` vector alone.

``run`` does: warm-up episodes with the prior alone (plus any stored ``EpisodeRecord`` passed to ``run``) →
fit and freeze the RL token on their embeddings (unless it was fitted already) → seed the replay buffer from
them and train on it (``utd_ratio`` updates per warm-up chunk, once the buffer holds ``learning_starts``) →
online episodes, with ``utd_ratio`` updates per collected chunk after each episode. Every finished episode is
emitted as an ``EpisodeRecord`` to the episode sink ``on_episode`` (e.g. ``ExperienceStore.write_episode`` or
``actors.sinks.StoreSink``), so online steps are committed to the store like every other episode.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from core.types import InterventionSegment, Outcome, StepSource, episode_outcome
from policies.base import ActionChunk, Observation, Policy, stack_observations
from policies.train_state import load_state, save_state
from rlt.buffer import ChunkTransition, chunk_backup
from rlt.config import LearnerConfig, OnlineConfig
from rlt.errors import EmbeddingDimError, NonChunkActionError, RLTInputError
from rlt.phase import AlwaysCritical, PhaseSwitch
from rlt.rl_token import RLToken, fit_rl_token
from rlt.state import RLStateEncoder
from rlt.td3 import ChunkedTD3
from storage.records import EpisodeRecord

Mode = Literal["prior", "learner", "eval"]


@dataclass(frozen=True)
class ChunkContext:
    """What the learner conditions on at a chunk start: VLA embeddings ``T×E``, proprio, reference ``C×D``."""

    embeddings: np.ndarray
    proprio: np.ndarray
    reference: np.ndarray


@dataclass(frozen=True)
class ChunkStep:
    """One executed chunk: its context, the executed ``C×D`` chunk and the rewards of its executed steps.

    ``inner`` holds the contexts recomputed every ``stride`` steps inside the chunk (offsets ``stride``,
    ``2·stride``, … below the executed length; empty without a stride); ``human`` the per-step mask of
    human steps (``C`` entries; None: all steps if ``intervened``)."""

    context: ChunkContext
    executed: np.ndarray
    rewards: np.ndarray
    terminated: bool
    critical: bool
    intervened: bool
    inner: tuple[ChunkContext, ...] = ()
    human: np.ndarray | None = None


@dataclass
class EpisodeChunks:
    """An episode at chunk level; ``final`` is the context after the last chunk of a truncated episode."""

    steps: list[ChunkStep]
    final: ChunkContext | None = None


@dataclass(frozen=True)
class EpisodeStats:
    """Per-episode statistics of the online loop."""

    index: int
    mode: Mode
    success: bool
    length: int
    env_steps: int
    critical_steps: int
    rl_chunks: int
    interventions: int
    losses: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalPoint:
    """Success rate of the deterministic learner after ``env_steps`` env steps (warm-up included)."""

    env_steps: int
    success_rate: float


class OnlineRLT:
    """The single-process online loop (see the module docstring).

    The constructor resets ``env`` once (seed ``config.seed``) to read the proprio width, and builds the
    learner with ``state_dim = token.config.z_dim + proprio``. Pass ``token_fitted=True`` with an already
    fitted token to skip fitting. ``on_episode`` is the episode sink: it receives every finished episode's
    ``EpisodeRecord`` (its return value is ignored, so ``ExperienceStore.write_episode`` and
    ``actors.sinks.StoreSink`` fit); ``on_stats`` receives every episode's ``EpisodeStats`` (progress display).
    """

    def __init__(
        self,
        env: gym.Env,
        prior: Policy,
        phase_switch: PhaseSwitch,
        token: RLToken | None,
        config: OnlineConfig,
        learner_config: LearnerConfig | None = None,
        on_episode: Callable[[EpisodeRecord], object] | None = None,
        token_fitted: bool = False,
        on_stats: Callable[[EpisodeStats], object] | None = None,
    ) -> None:
        self.env, self.prior, self.phase_switch = env, prior, phase_switch
        self.config, self.on_episode, self.on_stats = config, on_episode, on_stats
        self.token, self.token_fitted = token, token_fitted or token is None
        learner_config = learner_config or LearnerConfig(seed=config.seed)
        proprio_dim = int(np.asarray(env.reset(seed=config.seed)[0][config.state_key]).shape[0])
        self.encoder = RLStateEncoder(token, proprio_dim) if self.token_fitted else None
        z_dim = token.config.z_dim if token is not None else 0
        self.learner = ChunkedTD3(z_dim + proprio_dim, prior.action_dim, learner_config)
        self._offset: np.ndarray | None = None
        self.proprio_dim = proprio_dim
        self.rng = np.random.default_rng(config.seed)
        self.env_steps = 0
        self.episode_index = 0
        self.stats: list[EpisodeStats] = []
        self.curve: list[EvalPoint] = []
        self._pending: list[EpisodeChunks] = []
        self.last_evaluation: list[EpisodeChunks] = []

    @property
    def chunk_size(self) -> int:
        """``C``."""
        return self.learner.config.chunk_size

    def run(
        self, records: Iterable[EpisodeRecord] = (), state_path: str | Path | None = None
    ) -> list[EvalPoint]:
        """Warm up, fit the RL token, seed replay, train for ``total_env_steps``; return the eval curve.

        ``records`` (stored episodes of the task, e.g. the prior's earlier rollouts) join the warm-up: their
        embeddings help fit the token and their chunks seed the replay buffer (see ``seed_from_records``).
        With ``state_path`` the loop's state (learner weights, optimizers and replay, the token, counters, random
        state, curve) is written there atomically after every online episode, and a run that finds one skips
        the warm-up and continues from it.
        """
        state = load_state(state_path) if state_path is not None else None
        if state is not None:
            end, next_eval = self._restore(state)
        else:
            self.warm_up(records)
            end, next_eval = self.env_steps + self.config.total_env_steps, self.env_steps
        while self.env_steps < end:
            if self.config.eval_every_steps and self.env_steps >= next_eval:
                self.curve.append(EvalPoint(self.env_steps, self.evaluate(self.config.eval_episodes)))
                next_eval += self.config.eval_every_steps
            chunks, _ = self.run_episode("learner")
            self.learner.update(self._add_to_replay([chunks])[1])
            if state_path is not None:
                save_state(state_path, self._state(end, next_eval))
        if self.config.eval_every_steps:
            self.curve.append(EvalPoint(self.env_steps, self.evaluate(self.config.eval_episodes)))
        return self.curve

    def _state(self, end: int, next_eval: int) -> dict[str, Any]:
        """What ``run`` needs to continue after the current episode (see ``run``'s ``state_path``)."""
        self.learner.check_parameters()
        return {
            "learner": self.learner.training_state(),
            "token": self.token.state_dict() if self.token is not None else None,
            "counters": {"env_steps": self.env_steps, "episode_index": self.episode_index},
            "loop": {"end": end, "next_eval": next_eval},
            "rng": self.rng.bit_generator.state,
            "curve": [(point.env_steps, point.success_rate) for point in self.curve],
            "stats": self.stats,
        }

    def _restore(self, state: dict[str, Any]) -> tuple[int, int]:
        """Adopt a ``_state``; returns the loop's end and next evaluation step."""
        if state["token"] is not None:
            self.use_token(state["token"])
        self.learner.restore_training_state(state["learner"])
        self.env_steps = int(state["counters"]["env_steps"])
        self.episode_index = int(state["counters"]["episode_index"])
        self.rng.bit_generator.state = state["rng"]
        self.curve = [EvalPoint(steps, rate) for steps, rate in state["curve"]]
        self.stats = list(state["stats"])
        return int(state["loop"]["end"]), int(state["loop"]["next_eval"])

    def warm_up(self, records: Iterable[EpisodeRecord] = ()) -> int:
        """``run``'s first phase: prior episodes (+ ``records``) → fit the token → seed replay and train on it.

        Returns the number of transitions added to replay.
        """
        for _ in range(self.config.warmup_episodes):
            self._pending.append(self.run_episode("prior")[0])
        stored = self._record_chunks(records)
        self._pending.extend(stored)
        self.fit_token()
        played = self._pending[: len(self._pending) - len(stored)]
        added, chunks = self._add_to_replay(played)
        stored_added, stored_chunks = self._add_to_replay(stored, demo=True)
        self.learner.update(chunks + stored_chunks)
        self._pending = []
        return added + stored_added

    def fit_token(self, episodes: list[EpisodeChunks] | None = None) -> list[float]:
        """Fit and freeze the RL token on the embeddings of ``episodes`` (default: the collected warm-up
        episodes), once."""
        if self.token_fitted or self.token is None:
            return []
        episodes = self._pending if episodes is None else episodes
        if not episodes:
            raise RLTInputError(
                "warmup_episodes: expected ≥ 1 (or stored episodes) to fit the RL token, "
                "or pass token_fitted=True"
            )
        embeddings = np.stack([step.context.embeddings for episode in episodes for step in episode.steps])
        self.token.to(self.learner.device)
        losses = fit_rl_token(
            self.token,
            embeddings,
            steps=self.config.token_steps,
            batch_size=self.config.token_batch_size,
            seed=self.config.seed,
        )
        self.encoder = RLStateEncoder(self.token, self.proprio_dim)
        self.token_fitted = True
        return losses

    def use_token(self, state: dict[str, Any]) -> None:
        """Adopt an RL token fitted elsewhere (its ``state_dict``, e.g. from another loop), frozen."""
        self.token.load_state_dict(state)
        self.encoder = RLStateEncoder(self.token, self.proprio_dim)
        self.token_fitted = True

    def use_learner(self, learner: ChunkedTD3) -> None:
        """Act and evaluate with ``learner`` trained elsewhere (e.g. by a learner actor); same shapes required."""
        if (learner.state_dim, learner.action_dim) != (self.learner.state_dim, self.learner.action_dim):
            raise RLTInputError(
                f"learner: expected state/action dims {(self.learner.state_dim, self.learner.action_dim)}, "
                f"got {(learner.state_dim, learner.action_dim)}"
            )
        self.learner = learner

    def learn(self, episodes: list[EpisodeChunks]) -> int:
        """Add externally collected episodes (``run_episode`` output) to replay and train on them.

        Runs ``utd_ratio`` updates per new transition (once the buffer holds ``learning_starts``), as ``run``
        does after each online episode; returns the number of transitions added.
        """
        if self.encoder is None:
            raise RLTInputError("learn: the RL token must be fitted first (warm_up, fit_token or use_token)")
        added, chunks = self._add_to_replay(episodes)
        self.learner.update(chunks)
        return added

    def seed_from_records(self, records: Iterable[EpisodeRecord]) -> int:
        """Add stored episodes (warm-up data, interventions) to the replay buffer; return transitions added.

        Observations are rebuilt from each record and the prior is re-run at chunk starts for its embeddings;
        the recorded chunk (or, for human steps, the executed actions) is the reference. Records without a
        ``critical_phase`` flag get it from this loop's phase switch. The RL token must be fitted first
        (``fit_token`` or ``token_fitted=True``); image-based priors need records loaded with ``images=True``.
        With ``LearnerConfig.demo_fraction`` > 0 they go to the second replay (demonstrations).
        """
        return self._add_to_replay(self._record_chunks(records), demo=True)[0]

    def _record_chunks(self, records: Iterable[EpisodeRecord]) -> list[EpisodeChunks]:
        return [
            episode_chunks_from_record(
                record,
                self.prior,
                self.chunk_size,
                self.phase_switch,
                stride=self.learner.config.transition_stride,
                state_key=self.config.state_key,
            )
            for record in records
        ]

    def evaluate(self, episodes: int, mode: Mode = "eval") -> float:
        """Success rate over ``episodes`` episodes on fixed evaluation seeds (no exploration, no updates).

        The episodes' chunks stay in ``last_evaluation`` (e.g. for ``rlt.diagnostics.critic_calibration``).
        """
        played = [self.run_episode(mode, seed=self._eval_seed(j)) for j in range(episodes)]
        self.last_evaluation = [chunks for chunks, _ in played]
        return float(np.mean([stats.success for _, stats in played]))

    def run_episode(self, mode: Mode, seed: int | None = None) -> tuple[EpisodeChunks, EpisodeStats]:
        """Play one episode; emit its ``EpisodeRecord``; return its chunks and statistics.

        The learner acts after the hand-off once it has taken a gradient step; until then the prior does.
        """
        if mode != "prior" and self.encoder is None:
            raise RLTInputError(
                "mode: the RL token must be fitted before the learner acts (run warm-up first)"
            )
        seed = self._train_seed() if seed is None else seed
        observation, info = self.env.reset(seed=seed)
        self.prior.reset()
        self.phase_switch.reset()
        self._offset = None
        recorder = _EpisodeRecorder(self.config.record_images)
        chunks, critical, terminated, done = EpisodeChunks(steps=[]), False, False, False
        # an untrained actor (no gradient step yet) leaves the critical phase to the prior
        rl_ready = mode != "prior" and self.learner.weights_version > 0
        while not done:
            context, proposal = self.chunk_context(observation)
            critical = critical or self.phase_switch.is_critical(observation, info)
            acting_rl = critical and rl_ready
            planned = (
                self.learner_chunk(context, explore=mode == "learner") if acting_rl else context.reference
            )
            recorder.begin_chunk(
                context.reference,
                proposal.timing.get("infer_ms", 0.0),
                self.config.rl_version if acting_rl else self.prior.version,
                critical,
            )
            inner = critical and mode != "eval"
            observation, info, step, done = self._execute(observation, context, planned, recorder, inner)
            terminated = step.terminated
            chunks.steps.append(step)
        if not terminated:
            chunks.final = self.chunk_context(observation)[0]
        record = recorder.finish(self.config, self.prior.version, seed, mode, success=terminated)
        record.metadata["actor_updates"] = self.learner.weights_version
        if self.on_episode is not None:
            self.on_episode(record)
        stats = self._episode_stats(mode, chunks, record, rl_ready)
        self.stats.append(stats)
        if self.on_stats is not None:
            self.on_stats(stats)
        return chunks, stats

    def _execute(
        self,
        observation: Observation,
        context: ChunkContext,
        planned: np.ndarray,
        recorder: _EpisodeRecorder,
        inner_contexts: bool = False,
    ) -> tuple[Observation, dict[str, Any], ChunkStep, bool]:
        """Step the env through ``planned`` (until the episode ends); the env may substitute human actions.

        With ``inner_contexts`` the prior's context is recomputed every ``LearnerConfig.stride`` steps."""
        executed, rewards, intervened = planned.copy(), [], False
        human = np.zeros(self.chunk_size, bool)
        stride, inner = self.learner.config.transition_stride, []
        terminated = truncated = False
        for offset in range(self.chunk_size):
            before = observation
            if inner_contexts and offset > 0 and offset % stride == 0:
                inner.append(self.chunk_context(observation)[0])
            observation, _, terminated, truncated, info = self.env.step(planned[offset])
            source = StepSource(int(info.get("source", StepSource.POLICY)))
            executed[offset] = np.asarray(info.get("executed_action", planned[offset]), np.float32)
            human[offset] = source == StepSource.HUMAN
            intervened = intervened or human[offset]
            terminated = bool(terminated or info.get("success", False))
            rewards.append(float(info.get("success", False)))
            recorder.add_step(before, executed[offset], source, offset)
            recorder.end_step(rewards[-1], terminated, bool(truncated), info.get("intervention_trigger"))
            if terminated or truncated:
                break
        step = ChunkStep(
            context,
            executed,
            np.asarray(rewards),
            terminated,
            recorder.critical,
            bool(intervened),
            tuple(inner),
            human,
        )
        return observation, info, step, terminated or bool(truncated)

    def _episode_stats(
        self, mode: Mode, chunks: EpisodeChunks, record: EpisodeRecord, rl_ready: bool
    ) -> EpisodeStats:
        if mode != "eval":
            self.env_steps += record.length
        self.episode_index += 1
        return EpisodeStats(
            index=self.episode_index,
            mode=mode,
            success=record.outcome == Outcome.SUCCESS,
            length=record.length,
            env_steps=self.env_steps,
            critical_steps=int(np.sum(record.metadata["critical_phase"])),
            rl_chunks=sum(step.critical for step in chunks.steps) if rl_ready else 0,
            interventions=sum(step.intervened for step in chunks.steps),
            losses=dict(self.learner.last_losses),
        )

    def chunk_context(self, observation: Observation) -> tuple[ChunkContext, ActionChunk]:
        """What the learner conditions on at a chunk start (the prior's reference and embeddings), and the
        prior's whole proposal."""
        proposal = self.prior.infer(stack_observations([observation]))
        if proposal.embeddings is None:
            raise EmbeddingDimError(
                "embeddings: the prior returned none; wrap it in rlt.state.EmbeddingPrior"
            )
        reference = self._check_chunk("prior chunk", proposal.actions[0, : self.chunk_size])
        state = np.asarray(observation[self.config.state_key], np.float32)
        return ChunkContext(np.asarray(proposal.embeddings[0], np.float32), state, reference), proposal

    def _check_chunk(self, name: str, chunk: np.ndarray) -> np.ndarray:
        array = np.asarray(chunk, np.float32)
        if array.shape != self.learner.chunk_shape:
            raise NonChunkActionError(
                f"{name}: expected shape {self.learner.chunk_shape} (C×D; the prior's horizon must be ≥ C), "
                f"got {array.shape}"
            )
        return array

    def learner_chunk(self, context: ChunkContext, explore: bool) -> np.ndarray:
        """The learner's ``C×D`` chunk for ``context`` (with exploration noise if ``explore``, see
        ``OnlineConfig.exploration``), clipped to [−1, 1]."""
        assert self.encoder is not None
        state = self.encoder.encode(context.embeddings[None], context.proprio[None])
        chunk = self.learner.act(state, context.reference[None])[0]
        if explore:
            chunk = chunk + self.exploration_noise(chunk.shape)
        return np.clip(chunk, -1.0, 1.0).astype(np.float32)

    def exploration_noise(self, shape: tuple[int, ...]) -> np.ndarray:
        """The next chunk's ``C×D`` exploration noise (iid, or a held offset that is AR(1) across chunks)."""
        sigma = self.config.exploration_noise
        if self.config.exploration == "iid":
            return self.rng.normal(0.0, sigma, shape)
        fresh = self.rng.normal(0.0, sigma, shape[-1])
        rho = self.config.exploration_rho
        self._offset = fresh if self._offset is None else rho * self._offset + np.sqrt(1 - rho**2) * fresh
        return np.broadcast_to(self._offset, shape).copy()

    def _add_to_replay(self, episodes: list[EpisodeChunks], demo: bool = False) -> tuple[int, int]:
        """Add the episodes' transitions; returns (transitions, executed chunks they amount to)."""
        assert self.encoder is not None
        config = self.learner.config
        transitions = [
            transition
            for episode in episodes
            for transition in chunk_transitions(
                episode, self.encoder, config.gamma, n_step=config.n_step, stride=config.stride
            )
        ]
        for transition in transitions:
            self.learner.add_transition(transition, demo=demo)
        chunks = round(len(transitions) * config.transition_stride / config.chunk_size)
        return len(transitions), max(chunks, 1) if transitions else 0

    def _train_seed(self) -> int:
        return self.config.seed * 1_000_003 + self.episode_index

    def _eval_seed(self, index: int) -> int:
        return self.config.eval_seed_base + index


def chunk_transitions(
    episode: EpisodeChunks,
    encoder: RLStateEncoder,
    gamma: float,
    n_step: int = 1,
    stride: int | None = None,
) -> list[ChunkTransition]:
    """Critical-phase transitions of one episode (chunked backups, γ^k bootstraps).

    A transition starts at every step ``t`` that has a context (chunk starts, and every ``stride`` steps inside
    chunks that recorded ``inner`` contexts): its action is the ``C`` steps executed from ``t`` (crossing into
    the next chunk), its reference the prior's chunk at ``t``, and it bootstraps from the context ``n_step·C``
    steps later with ``R = Σ_j γ^j r_{t+j}`` and discount ``γ^k`` over the ``k`` steps in between. A terminal
    step inside that window ends the backup (``terminated``). Where the episode was truncated before the
    window ends it bootstraps from ``episode.final`` (the context after the last step); without it, or
    without a context at the bootstrap step, the transition is dropped. Rows of the action past the last
    executed step are the last chunk's planned rows (or the reference's).
    """
    if not episode.steps:
        return []
    size = episode.steps[0].executed.shape[0]
    stride = stride or size
    contexts: dict[int, ChunkContext] = {}
    critical: dict[int, bool] = {}
    actions, rewards, human, start = [], [], [], 0
    for step in episode.steps:
        length = len(step.rewards)
        contexts[start], critical[start] = step.context, step.critical
        for index, context in enumerate(step.inner, start=1):
            if index * stride < length:
                contexts[start + index * stride], critical[start + index * stride] = context, step.critical
        mask = step.human if step.human is not None else np.full(size, step.intervened)
        actions.append(step.executed[:length])
        rewards.append(np.asarray(step.rewards, np.float64))
        human.append(np.asarray(mask[:length], bool))
        start += length
    total, last = start, episode.steps[-1]
    if episode.final is not None and not last.terminated:
        contexts[total] = episode.final
    flat_actions = np.concatenate([*actions, last.executed[len(last.rewards) :]])
    flat_rewards, flat_human = np.concatenate(rewards), np.concatenate(human)
    positions = sorted(contexts)
    states = dict(
        zip(
            positions,
            encoder.encode(
                np.stack([contexts[t].embeddings for t in positions]),
                np.stack([contexts[t].proprio for t in positions]),
            ),
            strict=True,
        )
    )
    transitions = []
    for t in positions:
        if t >= total or not critical[t]:
            continue
        end = t + n_step * size
        terminated = last.terminated and total <= end
        bootstrap = t if terminated else min(end, total)
        if bootstrap not in contexts:
            continue
        steps = min(end, total) - t
        reference = np.asarray(contexts[t].reference, np.float32)
        action = reference.copy()
        executed = flat_actions[t : t + size]
        action[: len(executed)] = executed
        mask = np.zeros(size, bool)
        mask[: len(flat_human[t : t + size])] = flat_human[t : t + size]
        reward, discount = chunk_backup(flat_rewards[t : t + steps], gamma)
        transitions.append(
            ChunkTransition(
                state=states[t],
                reference=reference,
                action=action,
                reward=reward,
                next_state=states[bootstrap],
                next_reference=contexts[bootstrap].reference,
                terminated=terminated,
                discount=discount,
                intervened=bool(mask.any()),
                human=mask,
            )
        )
    return transitions


def episode_chunks_from_record(
    record: EpisodeRecord,
    prior: Policy,
    chunk_size: int,
    phase_switch: PhaseSwitch | None = None,
    stride: int | None = None,
    state_key: str = "state",
) -> EpisodeChunks:
    """Rebuild chunk steps from a stored episode, re-running ``prior`` at each chunk start for embeddings.

    Chunk starts are the steps with ``chunk_offsets == 0`` (every ``chunk_size`` steps for records without
    chunks). The reference is the recorded chunk; chunks containing a human step use the executed actions as
    both reference and action. ``metadata["critical_phase"]`` (if present) marks critical steps; otherwise
    ``phase_switch`` is asked at each chunk start (latched; no env info is stored, so it sees ``{}``), and
    without a switch every chunk counts as critical. With ``stride`` < ``chunk_size`` the prior is re-run every
    ``stride`` steps inside critical chunks for their ``inner`` contexts; ``state_key`` names the proprio vector
    (``"privileged"``: the record's privileged states).
    """
    length = record.length
    starts = _chunk_starts(record, chunk_size)
    stored = record.metadata.get("critical_phase")
    critical = np.asarray(stored if stored is not None else np.zeros(length), bool)
    switch = None if stored is not None else (phase_switch or AlwaysCritical())
    if switch is not None:
        switch.reset()
    steps, latched = [], False
    for start in starts:
        end = min(start + chunk_size, length)
        observation = _record_observation(record, start)
        if switch is not None:
            latched = latched or switch.is_critical(observation, {})
            critical[start] = latched
        context = _record_context(record, observation, prior, start, chunk_size, state_key)
        executed = context.reference.copy()
        executed[: end - start] = record.actions[start:end]
        human = np.zeros(chunk_size, bool)
        human[: end - start] = record.sources[start:end] == StepSource.HUMAN
        inner = ()
        if critical[start] and stride is not None and stride < chunk_size:
            inner = tuple(
                _record_context(record, _record_observation(record, t), prior, t, chunk_size, state_key)
                for t in range(start + stride, end, stride)
            )
        steps.append(
            ChunkStep(
                context,
                executed,
                np.asarray(record.rewards[start:end], np.float64),
                bool(np.any(record.terminated[start:end])),
                bool(critical[start]),
                bool(human.any()),
                inner,
                human,
            )
        )
    return EpisodeChunks(steps=steps)


def _chunk_starts(record: EpisodeRecord, chunk_size: int) -> list[int]:
    if np.all(record.chunk_ids < 0):
        return list(range(0, record.length, chunk_size))
    starts = [int(t) for t in np.flatnonzero(record.chunk_offsets == 0)]
    return starts if starts and starts[0] == 0 else [0, *starts]


def _record_observation(record: EpisodeRecord, t: int) -> Observation:
    observation = Observation(
        images={camera: frames[t] for camera, frames in record.images.items()},
        state=np.asarray(record.states[t], np.float32),
        prompt=record.prompt or str(record.metadata.get("prompt", record.task)),
    )
    if record.privileged is not None:
        observation["privileged"] = record.privileged[t]
    return observation


def _record_context(
    record: EpisodeRecord,
    observation: Observation,
    prior: Policy,
    t: int,
    chunk_size: int,
    state_key: str = "state",
) -> ChunkContext:
    proposal = prior.infer(stack_observations([observation]))
    if proposal.embeddings is None:
        raise EmbeddingDimError("embeddings: the prior returned none; wrap it in rlt.state.EmbeddingPrior")
    reference = np.asarray(proposal.actions[0, :chunk_size], np.float32)
    chunk_id = int(record.chunk_ids[t])
    if chunk_id >= 0 and record.chunk_offsets[t] == 0 and record.chunks.shape[1] >= chunk_size:
        reference = np.asarray(record.chunks[chunk_id, :chunk_size], np.float32)
    proprio = np.asarray(observation[state_key], np.float32)
    return ChunkContext(np.asarray(proposal.embeddings[0], np.float32), proprio, reference)


class _EpisodeRecorder:
    """Accumulates one episode's columns and builds the ``EpisodeRecord``.

    ``chunks`` holds the prior's reference chunk (first ``C`` actions) at every chunk start and ``actions``
    what was executed — RLT's chunk (with exploration noise) in the critical phase, the human's on takeover
    steps — so a record carries both ``ã`` and the executed chunk, as ``seed_from_records`` needs.
    ``policy_versions`` names the prior before the hand-off and ``OnlineConfig.rl_version`` after it;
    ``metadata["critical_phase"]`` marks the critical steps (0/1).
    """

    def __init__(self, record_images: bool) -> None:
        self.record_images = record_images
        self.columns: dict[str, list[Any]] = {
            key: []
            for key in (
                "states",
                "actions",
                "rewards",
                "terminated",
                "truncated",
                "sources",
                "policy_versions",
                "chunk_ids",
                "chunk_offsets",
                "latency_ms",
                "critical",
                "privileged",
            )
        }
        self.images: dict[str, list[np.ndarray]] = {}
        self.chunks: list[np.ndarray] = []
        self.latencies: list[float] = []
        self.triggers: list[str | None] = []
        self.version, self.critical = "", False

    def begin_chunk(self, reference: np.ndarray, latency_ms: float, version: str, critical: bool) -> None:
        """Start a chunk: the prior's reference, its inference latency, who acts and the phase flag."""
        self.chunks.append(np.asarray(reference, np.float32))
        self.latencies.append(float(latency_ms))
        self.version, self.critical = version, critical

    def add_step(self, observation: Observation, action: np.ndarray, source: StepSource, offset: int) -> None:
        """Record the observation before a step and the action executed from it."""
        columns, chunk_id, critical, version = self.columns, len(self.chunks) - 1, self.critical, self.version
        columns["states"].append(np.asarray(observation["state"], np.float32))
        columns["actions"].append(np.asarray(action, np.float32))
        columns["sources"].append(int(source))
        columns["policy_versions"].append(version if source == StepSource.POLICY else None)
        columns["chunk_ids"].append(chunk_id)
        columns["chunk_offsets"].append(offset)
        columns["latency_ms"].append(self.latencies[chunk_id] if offset == 0 else 0.0)
        columns["critical"].append(int(critical))
        if "privileged" in observation:
            columns["privileged"].append(np.asarray(observation["privileged"], np.float32))
        if self.record_images:
            for camera, frame in observation["images"].items():
                self.images.setdefault(camera, []).append(frame)

    def end_step(self, reward: float, terminated: bool, truncated: bool, trigger: str | None) -> None:
        """Record the step's outcome and, on human steps, the takeover trigger."""
        self.triggers.append(trigger)
        self.columns["rewards"].append(reward)
        self.columns["terminated"].append(terminated)
        self.columns["truncated"].append(truncated)

    def finish(
        self, config: OnlineConfig, prior_version: str, seed: int, mode: Mode, success: bool
    ) -> EpisodeRecord:
        columns = self.columns
        length = len(columns["actions"])
        outcome = episode_outcome(success, bool(columns["terminated"][-1]), bool(columns["truncated"][-1]))
        sources = np.asarray(columns["sources"], np.uint8)
        return EpisodeRecord(
            uuid=uuid.uuid4(),
            task=config.task,
            env_id=config.env_id,
            policy_version=config.rl_version if mode != "prior" else prior_version,
            seed=seed,
            outcome=outcome,
            states=np.stack(columns["states"]),
            actions=np.stack(columns["actions"]),
            rewards=np.asarray(columns["rewards"], np.float32),
            terminated=np.asarray(columns["terminated"], bool),
            truncated=np.asarray(columns["truncated"], bool),
            sources=sources,
            policy_versions=columns["policy_versions"],
            chunk_ids=np.asarray(columns["chunk_ids"], np.int32),
            chunk_offsets=np.asarray(columns["chunk_offsets"], np.int32),
            latency_ms=np.asarray(columns["latency_ms"], np.float32),
            chunks=np.stack(self.chunks),
            images={camera: np.stack(frames) for camera, frames in self.images.items()},
            privileged=np.stack(columns["privileged"]) if len(columns["privileged"]) == length else None,
            interventions=_intervention_segments(sources, self.triggers),
            metadata={
                "learner": "rlt",
                "mode": mode,
                "prior_version": prior_version,
                "critical_phase": columns["critical"],
            },
        )


def _intervention_segments(sources: np.ndarray, triggers: list[str | None]) -> list[InterventionSegment]:
    human = np.concatenate([[False], sources == StepSource.HUMAN, [False]])
    edges = np.flatnonzero(np.diff(human.astype(np.int8)))
    return [
        InterventionSegment(int(start), int(end), triggers[start] or "human")
        for start, end in zip(edges[::2], edges[1::2], strict=True)
    ]
