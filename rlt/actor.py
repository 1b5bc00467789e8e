"""The RLT actor as a ``Policy``: the frozen prior, and after the hand-off the chunked learner refining its chunk.

``RLTActor.infer`` asks the prior for a chunk (its first ``C`` actions are the reference ``ã``, its final
embeddings the learner's context). Each env's ``PhaseSwitch`` is asked at every chunk start and latches until
that env's ``reset_env``; once an env is in the critical phase and the learner has taken a gradient step, the
learner's chunk on ``x = (z_rl, proprio)`` and ``ã`` replaces the prior's there (``mode`` ``"learner"`` adds
exploration noise, ``"eval"`` acts deterministically, ``"prior"`` never lets the learner act). The returned
``ActionChunk`` carries per row the reference ``ã`` (``reference``), the hand-off flag (``critical``) and who
produced the actions (``versions``: ``rl_version`` or the prior's version), which the rollout recorder stores
beside the executed chunk.

Rows are envs: ``infer(batch)`` treats row ``i`` as env ``i``; ``infer_envs(batch, envs)`` names each row's env
(``actors.rollout.RolloutWorker`` does, so a worker stepping several envs keeps one hand-off per env), and
``infos`` the env info entries its switch declares (``info_keys``) for each row; without them it sees ``{}``.

The returned chunk also carries the prior's embeddings (``embeddings``): a rollout worker built with
``record_embeddings`` keeps them in each episode's record (``EpisodeRecord.chunk_embeddings``), so the learner
does not re-run the prior on the chunks the actor played.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

import numpy as np

from policies.base import ActionChunk, Observation, ObservationBatch, Policy, stack_observations
from rlt.config import OnlineSettings
from rlt.errors import EmbeddingDimError, NonChunkActionError, RLTInputError
from rlt.phase import PhaseSwitch
from rlt.state import RLStateEncoder
from rlt.td3 import ChunkedTD3

Mode = Literal["prior", "learner", "eval"]
MODES: tuple[Mode, ...] = ("prior", "learner", "eval")


class RLTActor:
    """A ``Policy`` of horizon ``C`` around ``prior`` (see the module docstring).

    ``switch`` is the hand-off template (copied per env); ``encoder`` is None until the RL token is fitted
    (``use_encoder``): until then the prior acts everywhere.
    ``exploration`` gives the noise of ``"learner"`` mode (``OnlineSettings.exploration*``); ``seed`` its stream.
    With ``defer_until_trained`` an untrained learner (no gradient step yet) leaves the critical phase to the prior.
    """

    def __init__(
        self,
        prior: Policy,
        switch: PhaseSwitch,
        learner: ChunkedTD3,
        encoder: RLStateEncoder | None,
        *,
        rl_version: str,
        mode: Mode = "eval",
        exploration: OnlineSettings | None = None,
        state_key: str = "state",
        seed: int = 0,
        defer_until_trained: bool = False,
    ) -> None:
        self.prior, self.learner, self.encoder = prior, learner, encoder
        self.rl_version, self.state_key = rl_version, state_key
        self.action_horizon, self.action_dim = learner.config.chunk_size, prior.action_dim
        self.exploration = exploration or OnlineSettings()
        self.defer_until_trained = defer_until_trained
        self._seed, self._rng_pid = seed, os.getpid()
        self._rng = np.random.default_rng(seed)
        self.switch = switch
        self._switches: dict[int, PhaseSwitch] = {}
        self._critical: dict[int, bool] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self.mode = mode

    @property
    def rng(self) -> np.random.Generator:
        """The exploration noise stream (seeded ``seed``; a copy unpickled in another process, e.g. a Ray rollout
        worker, draws a stream of its own from ``(seed, pid)``)."""
        if self._rng_pid != os.getpid():
            self._rng, self._rng_pid = np.random.default_rng([self._seed, os.getpid()]), os.getpid()
        return self._rng

    @property
    def version(self) -> str:
        """``rl_version``; the prior's version in ``prior`` mode (then it is the prior)."""
        return self.prior.version if self.mode == "prior" else self.rl_version

    @property
    def mode(self) -> Mode:
        """``prior``, ``learner`` (explores) or ``eval`` (deterministic)."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in MODES:
            raise RLTInputError(f"mode: expected one of {MODES}, got {mode!r}")
        self._mode = mode

    @property
    def learner_acts(self) -> bool:
        """Whether the learner takes over after the hand-off: not in ``prior`` mode, not before the RL token is
        fitted and, with ``defer_until_trained`` (online training), not before its first gradient step."""
        trained = self.learner.weights_version > 0 or not self.defer_until_trained
        return self.mode != "prior" and self.encoder is not None and trained

    def use_encoder(self, encoder: RLStateEncoder) -> None:
        """Act on ``x`` built by ``encoder`` (the fitted, frozen RL token)."""
        self.encoder = encoder

    def use_learner(self, learner: ChunkedTD3) -> None:
        """Act with ``learner`` (same state and action dims)."""
        if (learner.state_dim, learner.action_dim) != (self.learner.state_dim, self.learner.action_dim):
            raise RLTInputError(
                f"learner: expected state/action dims {(self.learner.state_dim, self.learner.action_dim)}, "
                f"got {(learner.state_dim, learner.action_dim)}"
            )
        self.learner = learner

    def reset(self) -> None:
        """Forget every env's hand-off and exploration state; reset the prior."""
        self._switches.clear()
        self._critical.clear()
        self._offsets.clear()
        self.prior.reset()

    def reset_env(self, env: int) -> None:
        """Start a new episode in env ``env``: its hand-off and exploration offset start over."""
        self._switches.pop(env, None)
        self._critical.pop(env, None)
        self._offsets.pop(env, None)
        self.prior.reset()

    def take_over(self, previous: Policy) -> None:
        """Continue the per-env hand-offs and exploration offsets of ``previous`` (an older ``RLTActor``)."""
        if isinstance(previous, RLTActor):
            self._switches, self._critical = dict(previous._switches), dict(previous._critical)
            self._offsets = dict(previous._offsets)

    def episode_metadata(self) -> dict[str, Any]:
        """What each episode records about the actor (``RolloutWorker`` asks at its start): ``learner: rlt``, the
        mode, the prior's version and ``actor_updates`` (the weights version acting)."""
        return {
            "learner": "rlt",
            "mode": self.mode,
            "prior_version": self.prior.version,
            "actor_updates": self.learner.weights_version,
        }

    @property
    def info_keys(self) -> tuple[str, ...]:
        """The env info entries the hand-off switch reads (``PhaseSwitch.info_keys``): what ``infos`` carries."""
        return tuple(self.switch.info_keys)

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        """``infer_envs`` with row ``i`` as env ``i``."""
        return self.infer_envs(batch, list(range(len(batch["prompt"]))))

    def infer_envs(
        self, batch: ObservationBatch, envs: list[int], infos: list[dict[str, Any]] | None = None
    ) -> ActionChunk:
        """The chunk for each row (row ``i`` is env ``envs[i]``, ``infos[i]`` its env info entries for the
        switch), with its reference, flag and version."""
        proposal = self.prior.infer(batch)
        references = self.references(proposal)
        infos = infos or [{}] * len(envs)
        flags = np.array(
            [self._is_critical(env, batch, row, infos[row]) for row, env in enumerate(envs)], bool
        )
        actions = references.copy()
        acting = np.flatnonzero(flags) if self.learner_acts else np.zeros(0, int)
        if len(acting):
            states = self.encoder.encode(
                np.asarray(proposal.embeddings, np.float32)[acting],
                np.asarray(batch[self.state_key], np.float32)[acting],
            )
            chunks = self.learner.act(states, references[acting])
            if self.mode == "learner":
                chunks = chunks + np.stack([self.exploration_noise(envs[row]) for row in acting])
            actions[acting] = np.clip(chunks, -1.0, 1.0)
        versions = [self.prior.version] * len(envs)
        for row in acting:
            versions[row] = self.rl_version
        return ActionChunk(
            actions=actions.astype(np.float32),
            embeddings=proposal.embeddings,
            timing=proposal.timing,
            reference=references,
            critical=flags,
            versions=versions,
        )

    def references(self, proposal: ActionChunk) -> np.ndarray:
        """The prior's ``B×C×D`` reference chunks (raises when it has no embeddings or too short a horizon)."""
        if proposal.embeddings is None:
            raise EmbeddingDimError(
                "embeddings: the prior returned none; wrap it in rlt.state.EmbeddingPrior"
            )
        references = np.asarray(proposal.actions[:, : self.action_horizon], np.float32)
        expected = (self.action_horizon, self.action_dim)
        if references.shape[1:] != expected:
            raise NonChunkActionError(
                f"prior chunk: expected shape {expected} (C×D; the prior's horizon must be ≥ C), "
                f"got {references.shape[1:]}"
            )
        return references

    def context(self, observation: Observation) -> tuple[np.ndarray, np.ndarray, ActionChunk]:
        """The prior's embeddings ``T×E`` and reference ``C×D`` at one observation, and its whole proposal."""
        proposal = self.prior.infer(stack_observations([observation]))
        reference = self.references(proposal)[0]
        return np.asarray(proposal.embeddings[0], np.float32), reference, proposal

    def exploration_noise(self, env: int = 0) -> np.ndarray:
        """Env ``env``'s next ``C×D`` exploration noise (iid, or a held offset that is AR(1) across its chunks)."""
        settings, shape = self.exploration, (self.action_horizon, self.action_dim)
        sigma = settings.exploration_noise
        if settings.exploration == "iid":
            return self.rng.normal(0.0, sigma, shape)
        fresh = self.rng.normal(0.0, sigma, shape[-1])
        rho, offset = settings.exploration_rho, self._offsets.get(env)
        offset = fresh if offset is None else rho * offset + np.sqrt(1 - rho**2) * fresh
        self._offsets[env] = offset
        return np.broadcast_to(offset, shape).copy()

    def _is_critical(self, env: int, batch: ObservationBatch, row: int, info: dict[str, Any]) -> bool:
        if not self._critical.get(env, False):
            switch = self._switches.get(env)
            if switch is None:
                switch = self._switches[env] = copy.deepcopy(self.switch)
                switch.reset()
            observation = Observation(**{key: value[row] for key, value in batch.items() if key != "images"})
            observation["images"] = {camera: frames[row] for camera, frames in batch["images"].items()}
            self._critical[env] = switch.is_critical(observation, info)
        return self._critical[env]
