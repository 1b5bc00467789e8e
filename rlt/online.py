"""The RLT learner: a frozen prior (the VLA), a phase switch, the RL token and the chunked actor-critic, fed with
episode records.

Episodes are played by the RLT actor (``rlt.actor.RLTActor``, ``OnlineRLT.actor``) through the common rollout path
(``actors.rollout.RolloutWorker`` + ``actors.recorder.EpisodeRecorder``; the driver is ``actors.rlt_loop``), which
stores for every chunk the executed chunk and the prior's reference ``ã`` (``EpisodeRecord.reference_chunks``) and
per step the hand-off flag (``metadata["critical_phase"]``). ``OnlineRLT`` turns each record back into chunk
steps (``episode_chunks_from_record``: the embeddings at chunk starts are the actor's, carried by the record
from the rollout worker (``EpisodeRecord.chunk_embeddings``, in process or over Ray), or else the prior re-run
there: a record loaded from the store) and those into
chunk transitions (``chunk_transitions``). Interventions come from the env (``envs.InterventionWrapper``): a
human step executed ``info["executed_action"]``; a chunk with any human step is learned with the executed
actions as the action and as ``ã`` (whole chunk or per human step, ``LearnerConfig.human_mask``). Reward is
sparse: +1 on the last step of a successful episode, which terminates it. With ``LearnerConfig.stride`` < ``C``
the prior is also re-run every ``stride`` steps inside critical chunks, so ``chunk_transitions`` can start a
transition there (overlapping chunks, contexts recomputed at each offset); ``n_step`` bootstraps several chunks
later. A learner built with ``token=None`` uses no RL token: ``x`` is the observation's
``OnlineConfig.state_key`` vector alone.

``warm_up`` fits and freezes the RL token on the embeddings of the prior's warm-up episodes (and any stored
episodes), seeds the replay buffers from them and trains on them; ``learn`` adds further episodes and runs
``utd_ratio`` updates per new chunk (once the buffer holds ``learning_starts``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.types import Outcome, StepSource
from policies.base import ActionChunk, Observation, Policy, stack_observations
from rlt.actor import Mode, RLTActor
from rlt.buffer import ChunkTransition, chunk_backup
from rlt.config import LearnerConfig, OnlineConfig
from rlt.errors import EmbeddingDimError, RLTInputError
from rlt.phase import AlwaysCritical, PhaseSwitch
from rlt.rl_token import RLToken, fit_rl_token
from rlt.state import RLStateEncoder
from rlt.td3 import ChunkedTD3
from storage.records import EpisodeRecord


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
    """An episode at chunk level; ``final`` is the context after the last chunk of a truncated episode.

    ``bootstraps`` holds contexts at steps where no chunk step starts but a transition bootstraps (after a human
    takeover the rollout worker replans, so chunk starts leave the ``C`` grid); no transition starts there."""

    steps: list[ChunkStep]
    final: ChunkContext | None = None
    bootstraps: dict[int, ChunkContext] = field(default_factory=dict)


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
    """The learner (see the module docstring): ``state_dim = token.config.z_dim + proprio_dim``.

    Pass ``token_fitted=True`` with an already fitted token to skip fitting. ``actor`` is the policy that
    plays its episodes (it follows the learner's weights and the fitted token).
    """

    def __init__(
        self,
        prior: Policy,
        phase_switch: PhaseSwitch,
        token: RLToken | None,
        config: OnlineConfig,
        learner_config: LearnerConfig | None = None,
        *,
        proprio_dim: int,
        token_fitted: bool = False,
    ) -> None:
        self.phase_switch, self.config = phase_switch, config
        self.token, self.token_fitted = token, token_fitted or token is None
        learner_config = learner_config or LearnerConfig(seed=config.seed)
        self.proprio_dim = proprio_dim
        self.encoder = RLStateEncoder(token, proprio_dim) if self.token_fitted else None
        z_dim = token.config.z_dim if token is not None else 0
        self.learner = ChunkedTD3(z_dim + proprio_dim, prior.action_dim, learner_config)
        self.actor = RLTActor(
            prior,
            phase_switch,
            self.learner,
            self.encoder,
            rl_version=config.rl_version,
            exploration=config,
            state_key=config.state_key,
            seed=config.seed,
            defer_until_trained=True,
        )

    @property
    def prior(self) -> Policy:
        """The frozen prior (the actor's)."""
        return self.actor.prior

    @prior.setter
    def prior(self, prior: Policy) -> None:
        self.actor.prior = prior

    @property
    def chunk_size(self) -> int:
        """``C``."""
        return self.learner.config.chunk_size

    def warm_up(self, played: list[EpisodeRecord], stored: Iterable[EpisodeRecord] = ()) -> int:
        """Fit the RL token on ``played`` (the prior's warm-up episodes) and ``stored`` episodes, add both to
        replay (``stored`` to the second replay when there is one) and train on them; returns transitions added."""
        fresh, kept = self.episode_chunks(played), self.episode_chunks(list(stored))
        self.fit_token([*fresh, *kept])
        added, chunks = self._add_to_replay(fresh)
        stored_added, stored_chunks = self._add_to_replay(kept, demo=True)
        self.learner.update(chunks + stored_chunks)
        return added + stored_added

    def fit_token(self, episodes: list[EpisodeChunks]) -> list[float]:
        """Fit and freeze the RL token on the embeddings of ``episodes``, once."""
        if self.token_fitted or self.token is None:
            return []
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
        self._use_encoder(RLStateEncoder(self.token, self.proprio_dim))
        return losses

    def use_token(self, state: dict[str, Any]) -> None:
        """Adopt an RL token fitted elsewhere (its ``state_dict``, e.g. from another learner), frozen."""
        self.token.load_state_dict(state)
        self._use_encoder(RLStateEncoder(self.token, self.proprio_dim))

    def _use_encoder(self, encoder: RLStateEncoder) -> None:
        self.encoder, self.token_fitted = encoder, True
        self.actor.use_encoder(encoder)

    def use_learner(self, learner: ChunkedTD3) -> None:
        """Act and evaluate with ``learner`` trained elsewhere (e.g. by a learner actor); same shapes required."""
        self.actor.use_learner(learner)
        self.learner = learner

    def learn(self, records: list[EpisodeRecord]) -> int:
        """Add the episodes' transitions to replay and train on them (``utd_ratio`` updates per new chunk, once
        the buffer holds ``learning_starts``); returns the number of transitions added."""
        if self.encoder is None:
            raise RLTInputError("learn: the RL token must be fitted first (warm_up, fit_token or use_token)")
        added, chunks = self._add_to_replay(self.episode_chunks(records))
        self.learner.update(chunks)
        return added

    def seed_from_records(self, records: Iterable[EpisodeRecord]) -> int:
        """Add stored episodes (warm-up data, interventions) to replay; return transitions added.

        The RL token must be fitted first (``fit_token`` or ``token_fitted=True``); image-based priors need
        records loaded with ``images=True``. With ``LearnerConfig.demo_fraction`` > 0 they go to the second
        replay (demonstrations).
        """
        return self._add_to_replay(self.episode_chunks(list(records)), demo=True)[0]

    def episode_chunks(self, records: list[EpisodeRecord]) -> list[EpisodeChunks]:
        """The records at chunk level (``episode_chunks_from_record`` with this learner's prior, switch,
        stride and state key): the prior is re-run only where a record does not carry the actor's embeddings
        (``EpisodeRecord.chunk_embeddings``)."""
        return [
            episode_chunks_from_record(
                record,
                self.prior,
                self.chunk_size,
                self.phase_switch,
                stride=self.learner.config.transition_stride,
                state_key=self.config.state_key,
                n_step=self.learner.config.n_step,
                bootstrap_truncated=self.learner.config.bootstrap_truncated,
            )
            for record in records
        ]

    def state(self) -> dict[str, Any]:
        """The learner's training state and the token's (what a resumed learner needs)."""
        self.learner.check_parameters()
        return {
            "learner": self.learner.training_state(),
            "token": self.token.state_dict() if self.token is not None else None,
            "rng": self.actor.rng.bit_generator.state,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Adopt a ``state``."""
        if state["token"] is not None:
            self.use_token(state["token"])
        self.learner.restore_training_state(state["learner"])
        self.actor.rng.bit_generator.state = state["rng"]

    def chunk_context(self, observation: Observation) -> tuple[ChunkContext, ActionChunk]:
        """What the learner conditions on at a chunk start (the prior's reference and embeddings), and the
        prior's whole proposal."""
        embeddings, reference, proposal = self.actor.context(observation)
        state = np.asarray(observation[self.config.state_key], np.float32)
        return ChunkContext(embeddings, state, reference), proposal

    def learner_chunk(self, context: ChunkContext) -> np.ndarray:
        """The deterministic learner's ``C×D`` chunk for ``context``, clipped to [−1, 1]."""
        assert self.encoder is not None
        state = self.encoder.encode(context.embeddings[None], context.proprio[None])
        return np.clip(self.learner.act(state, context.reference[None])[0], -1.0, 1.0).astype(np.float32)

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
    for t, context in episode.bootstraps.items():
        if t not in contexts:
            contexts[t], critical[t] = context, False
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
    n_step: int = 1,
    bootstrap_truncated: bool = False,
) -> EpisodeChunks:
    """Rebuild chunk steps from a stored episode, re-running ``prior`` at each chunk start for embeddings (unless
    the record carries the actor's, ``chunk_embeddings``).

    Chunk starts are the steps with ``chunk_offsets == 0``, and every ``chunk_size`` steps where none comes (a
    human takeover, a record without chunks). The reference is the recorded reference chunk
    (``reference_chunks``, RLT's ``ã``; else the recorded chunk; the prior's fresh chunk where none was
    recorded); chunks containing a human step use the executed actions as both reference and action. Rewards
    are sparse (``_sparse_rewards``). ``metadata["critical_phase"]`` (if present) marks critical steps; otherwise
    ``phase_switch`` is asked at each chunk start (latched; no env info is stored, so it sees ``{}``), and
    without a switch every chunk counts as critical. With ``stride`` < ``chunk_size`` the prior is re-run every
    ``stride`` steps inside critical chunks for their ``inner`` contexts; ``state_key`` names the proprio vector
    (``"privileged"``: the record's privileged states). Where a critical context's ``n_step·C`` bootstrap step
    holds no chunk start (a takeover moved them), the prior is re-run there too (``EpisodeChunks.bootstraps``).
    With ``bootstrap_truncated``, a truncated record's ``final_observation`` (the observation after its last
    step) becomes ``EpisodeChunks.final``, its reference the prior's fresh chunk there; without it, or for a
    record without one (stored before it existed, or by a writer that keeps none), there is no ``final`` and
    the last transitions are dropped. The record's ``chunk_embeddings`` (``K×T×E``, one per recorded chunk: the
    prior's embeddings at its start, as the actor computed them) spare the prior's re-run at the recorded chunk
    starts, whose reference is then the recorded one; it still runs where no chunk was recorded (off-grid,
    inner, final).
    """
    length, embeddings = record.length, record.chunk_embeddings
    if embeddings is not None and len(embeddings) != len(record.chunks):
        raise RLTInputError(
            f"chunk_embeddings: expected one per recorded chunk ({len(record.chunks)}) of episode "
            f"{record.uuid}, got {len(embeddings)}"
        )

    def context_at(t: int, observation: Observation | None = None) -> ChunkContext:
        observation = _record_observation(record, t) if observation is None else observation
        return _record_context(record, observation, prior, t, chunk_size, state_key, embeddings)

    spans = _chunk_spans(record, chunk_size)
    rewards, terminated = _sparse_rewards(record)
    stored = record.metadata.get("critical_phase")
    critical = np.asarray(stored if stored is not None else np.zeros(length), bool)
    switch = None if stored is not None else (phase_switch or AlwaysCritical())
    if switch is not None:
        switch.reset()
    steps, latched, critical_starts = [], False, set()
    for start, end in spans:
        observation = _record_observation(record, start)
        if switch is not None:
            latched = latched or switch.is_critical(observation, {})
            critical[start] = latched
        context = context_at(start, observation)
        executed = context.reference.copy()
        executed[: end - start] = record.actions[start:end]
        human = np.zeros(chunk_size, bool)
        human[: end - start] = record.sources[start:end] == StepSource.HUMAN
        inner, inner_starts = (), range(start + stride, end, stride) if stride else range(0)
        if critical[start] and stride is not None and stride < chunk_size:
            inner = tuple(context_at(t) for t in inner_starts)
            critical_starts.update(inner_starts)
        if critical[start]:
            critical_starts.add(start)
        steps.append(
            ChunkStep(
                context,
                executed,
                rewards[start:end],
                bool(np.any(terminated[start:end])),
                bool(critical[start]),
                bool(human.any()),
                inner,
                human,
            )
        )
    chunk_starts = {start for start, _ in spans} | critical_starts
    missing = {t + n_step * chunk_size for t in critical_starts} - chunk_starts
    bootstraps = {t: context_at(t) for t in sorted(missing) if t < length}
    final = None
    if bootstrap_truncated and record.final_observation is not None and not terminated[-1]:
        final = context_at(length, record.final_observation)
    return EpisodeChunks(steps=steps, final=final, bootstraps=bootstraps)


def _sparse_rewards(record: EpisodeRecord) -> tuple[np.ndarray, np.ndarray]:
    """RLT's reward and terminal flags per step: +1 on the last step of a successful episode, which ends it
    (whatever reward the env reported, e.g. Meta-World's dense one); else 0, terminal where the env ended it."""
    rewards = np.zeros(record.length, np.float64)
    terminated = np.asarray(record.terminated, bool).copy()
    if record.outcome == Outcome.SUCCESS and record.length:
        rewards[-1], terminated[-1] = 1.0, True
    return rewards, terminated


def _chunk_spans(record: EpisodeRecord, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk step: from each chunk start (``chunk_offsets == 0``, and step 0) to the
    next, cut every ``chunk_size`` steps (a human takeover longer than a chunk, a record without chunks)."""
    starts = {0, *(int(t) for t in np.flatnonzero((record.chunk_offsets == 0) & (record.chunk_ids >= 0)))}
    bounds = [*sorted(starts), record.length]
    return [
        (start, min(start + chunk_size, end))
        for begin, end in itertools.pairwise(bounds)
        for start in range(begin, end, chunk_size)
    ]


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
    embeddings: np.ndarray | None = None,
) -> ChunkContext:
    """The context at step ``t`` (``t`` = T: after the last step): the actor's embeddings and the recorded
    reference at a recorded chunk start when ``embeddings`` has them, else the prior re-run on ``observation``
    (the recorded reference at a recorded chunk start, the prior's fresh chunk elsewhere)."""
    chunk_id = int(record.chunk_ids[t]) if t < record.length else -1  # the final observation: no chunk
    recorded = record.chunks if record.reference_chunks is None else record.reference_chunks
    at_chunk = chunk_id >= 0 and record.chunk_offsets[t] == 0 and recorded.shape[1] >= chunk_size
    proprio = np.asarray(observation[state_key], np.float32)
    if at_chunk and embeddings is not None:
        reference = np.asarray(recorded[chunk_id, :chunk_size], np.float32)
        return ChunkContext(np.asarray(embeddings[chunk_id], np.float32), proprio, reference)
    proposal = prior.infer(stack_observations([observation]))
    if proposal.embeddings is None:
        raise EmbeddingDimError("embeddings: the prior returned none; wrap it in rlt.state.EmbeddingPrior")
    reference = np.asarray(proposal.actions[0, :chunk_size], np.float32)
    if at_chunk:
        reference = np.asarray(recorded[chunk_id, :chunk_size], np.float32)
    return ChunkContext(np.asarray(proposal.embeddings[0], np.float32), proprio, reference)
