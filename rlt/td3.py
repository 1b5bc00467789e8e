"""The RLT actor-critic: SB3's TD3 extended at its seams for action chunks and a VLA reference.

What changes relative to ``stable_baselines3.TD3`` (everything else — twin critics, target policy smoothing,
delayed actor updates, Polyak targets, optimizers — is TD3's own):

- spaces: the observation is ``x ‖ flatten(ã)`` (RL state and the VLA's reference chunk), the action a whole
  flattened chunk ``C·D`` in ``[−1, 1]``;
- ``RLTPolicy.make_actor`` / ``make_critic``: the critics read only ``x`` (a slicing features extractor),
  ``Q(x, a_chunk)``; both standardize ``x`` with statistics fitted on the warm-up data (``normalize_state``);
- ``ChunkReplayBuffer``: chunk transitions with per-entry bootstrap discounts ``γ^k``;
- ``ChunkedTD3.train``: critic target ``R + (1 − terminated) · γ^k · min Q'`` (min over ``target_critics``
  members sampled from an ensemble of ``n_critics``, REDQ-style; optional LayerNorm); actor loss
  ``−w · Q(x, π(x, ã_drop)) + β · ‖π − ã‖²`` with the reference zeroed in the actor input for a fraction
  ``ref_dropout`` of the batch, after ``critic_warmup_updates`` critic-only updates and with ``w`` / ``β``
  ramped linearly (``q_weight_start → q_weight``, ``beta → beta_end``); every loss is checked for finiteness
  before its optimizer step;
- a second replay (``demo_fraction`` > 0): demonstrations and interventions sampled beside online data.

Training runs without ``learn()``: the online loop (``rlt.online``) collects chunks and calls ``update``. The
settings are ``rlt.config.LearnerConfig``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from safetensors.torch import load_file, save_file
from stable_baselines3 import TD3
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import ContinuousCritic
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.utils import polyak_update
from stable_baselines3.td3.policies import Actor, TD3Policy
from torch.nn import functional as F

from policies.device import resolve_device
from policies.train_state import capture_rng, load_state, restore_rng, save_state
from rlt.buffer import ChunkReplayBuffer, ChunkTransition
from rlt.config import LearnerConfig
from rlt.errors import CriticDivergedError, NonChunkActionError, RLTInputError

#: Smallest per-entry standard deviation used by the state normalization (near-constant entries stay near 0).
STATE_STD_FLOOR = 1e-3


class RLStateFeatures(BaseFeaturesExtractor):
    """Features = the standardized RL state ``(x − μ) / σ``, followed by the raw reference ``ã`` if ``with_reference``.

    ``μ``, ``σ`` and ``fitted`` are buffers: the identity until ``ChunkedTD3.fit_state_normalization``, and
    they travel with the weights (checkpoints, actor weight sync).
    """

    def __init__(self, observation_space: spaces.Box, state_dim: int, with_reference: bool) -> None:
        features_dim = int(observation_space.shape[0]) if with_reference else state_dim
        super().__init__(observation_space, features_dim=features_dim)
        self.state_dim, self.with_reference = state_dim, with_reference
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))
        self.register_buffer("fitted", torch.zeros(()))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        state = (observations[:, : self.state_dim] - self.state_mean) / self.state_std
        if not self.with_reference:
            return state
        return torch.cat([state, observations[:, self.state_dim :]], dim=1)


class ChunkCritic(ContinuousCritic):
    """SB3's ``ContinuousCritic`` (``n_critics`` members), optionally with LayerNorm after every hidden layer."""

    def __init__(self, *args: Any, layer_norm: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not layer_norm:
            return
        in_dim = kwargs["features_dim"] + int(np.prod(self.action_space.shape))
        sizes = [in_dim, *kwargs["net_arch"]]
        self.q_networks = []
        for index in range(self.n_critics):
            layers: list[torch.nn.Module] = []
            for width_in, width_out in itertools.pairwise(sizes):
                layers += [
                    torch.nn.Linear(width_in, width_out),
                    torch.nn.LayerNorm(width_out),
                    torch.nn.ReLU(),
                ]
            network = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], 1))
            self.add_module(f"qf{index}", network)
            self.q_networks.append(network)


class RLTPolicy(TD3Policy):
    """TD3 policy whose actor reads ``x ‖ ã`` and whose critics read only ``x`` and the action chunk."""

    def __init__(self, *args: Any, state_dim: int, critic_layer_norm: bool = False, **kwargs: Any) -> None:
        self.state_dim, self.critic_layer_norm = state_dim, critic_layer_norm
        super().__init__(*args, **kwargs)

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> Actor:
        extractor = RLStateFeatures(self.observation_space, self.state_dim, with_reference=True)
        return Actor(**self._update_features_extractor(self.actor_kwargs, extractor)).to(self.device)

    def make_critic(self, features_extractor: BaseFeaturesExtractor | None = None) -> ContinuousCritic:
        extractor = RLStateFeatures(self.observation_space, self.state_dim, with_reference=False)
        kwargs = self._update_features_extractor(self.critic_kwargs, extractor)
        return ChunkCritic(**kwargs, layer_norm=self.critic_layer_norm).to(self.device)

    def state_features(self) -> list[RLStateFeatures]:
        """The standardizing extractors of actor, critics and their targets."""
        networks = (self.actor, self.actor_target, self.critic, self.critic_target)
        return [network.features_extractor for network in networks]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {
            **super()._get_constructor_parameters(),
            "state_dim": self.state_dim,
            "critic_layer_norm": self.critic_layer_norm,
        }


def apply_reference_dropout(
    observations: torch.Tensor, state_dim: int, rate: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the reference part of a random ``rate`` fraction of rows; return (observations, kept mask)."""
    keep = (torch.rand(observations.shape[0], generator=generator) >= rate).to(observations.device)
    dropped = observations.clone()
    dropped[~keep, state_dim:] = 0.0
    return dropped, keep


class ChunkedTD3(TD3):
    """RLT's actor-critic: TD3 over ``(x, ã) → chunk`` with reference regularization (see the module)."""

    replay_buffer: ChunkReplayBuffer

    def __init__(self, state_dim: int, action_dim: int, config: LearnerConfig | None = None) -> None:
        self.config = config or LearnerConfig()
        self.state_dim, self.action_dim = state_dim, action_dim
        chunk_flat = self.config.chunk_size * action_dim
        super().__init__(
            RLTPolicy,
            env=None,
            learning_rate=self.config.learning_rate,
            buffer_size=self.config.buffer_size,
            learning_starts=self.config.learning_starts,
            batch_size=self.config.batch_size,
            tau=self.config.tau,
            gamma=self.config.gamma,
            policy_delay=self.config.policy_delay,
            target_policy_noise=self.config.target_policy_noise,
            target_noise_clip=self.config.target_noise_clip,
            replay_buffer_class=ChunkReplayBuffer,
            replay_buffer_kwargs={
                "state_dim": state_dim,
                "chunk_size": self.config.chunk_size,
                "action_dim": action_dim,
            },
            policy_kwargs={
                "net_arch": list(self.config.net_arch),
                "state_dim": state_dim,
                "n_critics": self.config.n_critics,
                "critic_layer_norm": self.config.critic_layer_norm,
            },
            seed=self.config.seed,
            device=resolve_device(self.config.device),
            _init_setup_model=False,
        )
        self.observation_space = spaces.Box(-np.inf, np.inf, (state_dim + chunk_flat,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (chunk_flat,), np.float32)
        self.n_envs = 1
        self._setup_model()
        self.set_logger(Logger(folder=None, output_formats=[]))
        self.dropout_generator = torch.Generator().manual_seed(self.config.seed)
        self.demo_buffer = (
            ChunkReplayBuffer(
                self.buffer_size,
                self.observation_space,
                self.action_space,
                device=self.device,
                state_dim=state_dim,
                chunk_size=self.config.chunk_size,
                action_dim=action_dim,
            )
            if self.config.demo_fraction > 0
            else None
        )
        self.last_losses: dict[str, float] = {}
        if self.config.residual_scale is not None:
            self._zero_last_layer()

    def _zero_last_layer(self) -> None:
        """ResFiT initialisation: the residual actor (and its target) output exactly zero at the start."""
        last = [module for module in self.actor.mu if isinstance(module, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.actor_target.load_state_dict(self.actor.state_dict())

    def policy_chunks(
        self,
        actor: torch.nn.Module,
        observations: torch.Tensor,
        actor_input: torch.Tensor | None = None,
        output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flat chunks of ``actor`` for stored observations ``x ‖ ã`` (``ã + s · π`` in residual mode).

        ``actor_input`` (default: ``observations``) is what the network reads, e.g. with the reference dropped;
        ``output`` is the network's output when already computed.
        """
        output = actor(observations if actor_input is None else actor_input) if output is None else output
        if self.config.residual_scale is None:
            return output
        reference = observations[:, self.state_dim :]
        return (reference + self.config.residual_scale * output).clamp(-1.0, 1.0)

    def smoothed_next_chunks(self, next_observations: torch.Tensor) -> torch.Tensor:
        """The target actor's chunks at ``x' ‖ ã'`` with TD3's clipped target noise (see ``target_noise_space``)."""
        output = self.actor_target(next_observations)
        noise = output.clone().normal_(0, self.target_policy_noise)
        noise = noise.clamp(-self.target_noise_clip, self.target_noise_clip)
        if self.config.residual_scale is not None and self.config.target_noise_space == "residual":
            return self.policy_chunks(
                self.actor_target, next_observations, output=(output + noise).clamp(-1, 1)
            )
        return (self.policy_chunks(self.actor_target, next_observations, output=output) + noise).clamp(-1, 1)

    def target_members(self) -> list[int]:
        """Indices of the critic members whose min forms this update's target (random subset, REDQ-style)."""
        n, k = self.config.n_critics, self.config.target_critics
        if k == n:
            return list(range(n))
        return sorted(torch.randperm(n, generator=self.dropout_generator)[:k].tolist())

    @property
    def chunk_shape(self) -> tuple[int, int]:
        """``(C, D)``."""
        return self.config.chunk_size, self.action_dim

    def add_transition(self, transition: ChunkTransition, demo: bool = False) -> None:
        """Store one chunk transition (validated there): in the second replay when ``demo`` (a demonstration)
        or the transition has human steps and ``demo_fraction`` > 0, else in the online replay."""
        to_demo = self.demo_buffer is not None and (demo or transition.intervened)
        (self.demo_buffer if to_demo else self.replay_buffer).add_chunk(transition, self.config.human_mask)

    def sample(self, batch_size: int) -> ReplayBufferSamples:
        """A batch: ``demo_fraction`` of it from the second replay (when it holds data), the rest online."""
        demo = self.demo_buffer
        online_size = self.replay_buffer.size()
        if demo is None or demo.size() == 0:
            return self.replay_buffer.sample(batch_size)
        n_demo = batch_size if online_size == 0 else round(batch_size * self.config.demo_fraction)
        parts = [demo.sample(n_demo)] + (
            [self.replay_buffer.sample(batch_size - n_demo)] if n_demo < batch_size else []
        )
        return ReplayBufferSamples(*(torch.cat(fields) for fields in zip(*parts, strict=True)))

    def replay_size(self) -> int:
        """Transitions held in both replays."""
        return self.replay_buffer.size() + (self.demo_buffer.size() if self.demo_buffer is not None else 0)

    @property
    def weights_version(self) -> int:
        """Gradient steps taken so far: names the actor weights (``metadata["actor_updates"]`` of records)."""
        return int(self._n_updates)

    def actor_weights(self) -> dict[str, torch.Tensor]:
        """A detached copy of the actor's weights (what acting needs; critics and targets stay here)."""
        return {name: value.detach().cpu().clone() for name, value in self.actor.state_dict().items()}

    def load_actor_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Act with ``weights`` from another learner (e.g. a remote one); ``version`` is its ``weights_version``."""
        if version < 0:
            raise RLTInputError(f"version: expected ≥ 0, got {version}")
        self.actor.load_state_dict(weights)
        self._n_updates = int(version)

    def update(self, new_transitions: int = 1) -> int:
        """Run ``utd_ratio × new_transitions`` critic updates once the buffer holds ``learning_starts``.

        Returns the number of gradient steps taken.
        """
        if self.replay_size() < self.learning_starts or new_transitions <= 0:
            return 0
        if self.config.normalize_state and not self.state_normalization_fitted:
            buffers = [b for b in (self.replay_buffer, self.demo_buffer) if b is not None and b.size()]
            states = np.concatenate([b.split(b.observations[: b.size(), 0])[0] for b in buffers])
            self.fit_state_normalization(states)
        steps = self.config.utd_ratio * new_transitions
        self.train(gradient_steps=steps, batch_size=self.batch_size)
        return steps

    @property
    def state_normalization_fitted(self) -> bool:
        """Whether ``fit_state_normalization`` has run (also true for a learner loaded from such a checkpoint)."""
        return bool(self.policy.state_features()[0].fitted)

    def fit_state_normalization(self, states: np.ndarray) -> None:
        """Standardize RL states with the per-entry mean and std of ``states`` (``N×S``) in every network.

        Entries that barely vary (std below ``STATE_STD_FLOOR``) are divided by the floor instead.
        """
        states = np.asarray(states, dtype=np.float32)
        if states.ndim != 2 or states.shape[1] != self.state_dim or len(states) < 2:
            raise RLTInputError(f"states: expected N×{self.state_dim} with N ≥ 2, got {states.shape}")
        mean = torch.as_tensor(states.mean(axis=0), device=self.device)
        std = torch.as_tensor(states.std(axis=0), device=self.device).clamp_min(STATE_STD_FLOOR)
        for features in self.policy.state_features():
            features.state_mean.copy_(mean)
            features.state_std.copy_(std)
            features.fitted.fill_(1.0)

    def act(self, states: np.ndarray, references: np.ndarray) -> np.ndarray:
        """Deterministic actor chunks ``B×C×D`` for RL states ``B×S`` and reference chunks ``B×C×D``."""
        states = np.asarray(states, dtype=np.float32)
        references = np.asarray(references, dtype=np.float32)
        if states.ndim != 2 or states.shape[1] != self.state_dim:
            raise RLTInputError(f"states: expected shape B×{self.state_dim}, got {states.shape}")
        if references.shape != (states.shape[0], *self.chunk_shape):
            raise NonChunkActionError(
                f"references: expected shape {(states.shape[0], *self.chunk_shape)} (B×C×D), "
                f"got {references.shape}"
            )
        observations = np.concatenate([states, references.reshape(len(states), -1)], axis=1)
        with torch.no_grad():
            observations = torch.as_tensor(observations, device=self.device)
            chunks = self.policy_chunks(self.actor, observations).cpu().numpy()
        return chunks.reshape(len(states), *self.chunk_shape)

    def q_values(self, states: np.ndarray, references: np.ndarray, chunks: np.ndarray) -> np.ndarray:
        """Min over the critic members of ``B×C×D`` chunks at RL states ``B×S`` with reference chunks ``B×C×D`` (diagnostics)."""
        observations = np.concatenate([states, references.reshape(len(states), -1)], axis=1)
        with torch.no_grad():
            q_pair = self.critic(
                torch.as_tensor(observations, dtype=torch.float32, device=self.device),
                torch.as_tensor(
                    np.reshape(chunks, (len(states), -1)), dtype=torch.float32, device=self.device
                ),
            )
        return torch.cat(q_pair, dim=1).min(dim=1).values.cpu().numpy()

    def critic_targets(self, batch: ReplayBufferSamples, members: list[int] | None = None) -> torch.Tensor:
        """Chunked TD targets ``R + (1 − terminated) · γ^k · min_{i ∈ members} Q'_i(x', π'(x', ã') + ε)``.

        ``members`` defaults to ``target_members()`` (all members unless ``target_critics < n_critics``)."""
        members = self.target_members() if members is None else members
        with torch.no_grad():
            next_actions = self.smoothed_next_chunks(batch.next_observations)
            next_q = torch.cat(self.critic_target(batch.next_observations, next_actions), dim=1)
            next_q = next_q[:, members].min(dim=1, keepdim=True).values
            return batch.rewards + (1 - batch.dones) * batch.discounts * next_q

    def actor_loss(
        self, observations: torch.Tensor, weights: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """``−w · Q(x, π(x, ã with dropout)) + β · ‖π − ã‖²`` (squared norm summed or averaged over the chunk's
        entries, ``beta_reduction``; on the residual with ``beta_on="residual"``; mean over the batch).

        ``Q`` is ``Q1``, the min or the mean of the members (``LearnerConfig.actor_q``); ``(w, β)`` default to
        ``LearnerConfig.q_weight`` and ``beta`` (``train`` passes the schedule's)."""
        q_weight, beta = weights or (self.config.q_weight, self.config.beta)
        actor_input, _ = apply_reference_dropout(
            observations, self.state_dim, self.config.ref_dropout, self.dropout_generator
        )
        output = self.actor(actor_input)
        actions = self.policy_chunks(self.actor, observations, output=output)
        if q_weight == 0:
            q_value = torch.zeros(())
        elif self.config.actor_q == "q1":
            q_value = self.critic.q1_forward(observations, actions).mean()
        else:
            values = torch.cat(self.critic(observations, actions), dim=1)
            q_value = (
                values.min(dim=1).values if self.config.actor_q == "min" else values.mean(dim=1)
            ).mean()
        if self.config.beta_on == "residual":
            deviation = output
        else:
            deviation = actions - observations[:, self.state_dim :]
        squared = deviation**2
        regression = (
            squared.mean(dim=1) if self.config.beta_reduction == "mean" else squared.sum(dim=1)
        ).mean()
        return -q_weight * q_value + beta * regression

    def train(self, gradient_steps: int, batch_size: int = 256) -> None:
        """TD3's update loop with chunked targets and the reference-regularized actor loss."""
        self.policy.set_training_mode(True)
        self._update_learning_rate([self.actor.optimizer, self.critic.optimizer])
        critic_losses, actor_losses = [], []
        # with q_weight 0 throughout (the critic-free ablation) the critic never reaches the actor: skip it
        train_critic = max(self.config.q_weight, self.config.q_weight_start or 0.0) > 0
        for _ in range(gradient_steps):
            self._n_updates += 1
            batch = self.sample(batch_size)
            if train_critic:
                target = self.critic_targets(batch)
                current = self.critic(batch.observations, batch.actions)
                critic_loss = sum(F.mse_loss(q_value, target) for q_value in current)
                _step(self.critic.optimizer, _finite("critic_loss", critic_loss))
                critic_losses.append(critic_loss.item())
            if self._n_updates <= self.config.critic_warmup_updates:  # critic warm-up: no actor update
                if self._n_updates % self.policy_delay == 0:
                    polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)
                continue
            if self._n_updates % self.policy_delay == 0:
                actor_loss = self.actor_loss(batch.observations, self.config.loss_weights(self._n_updates))
                _step(self.actor.optimizer, _finite("actor_loss", actor_loss))
                actor_losses.append(actor_loss.item())
                polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)
                polyak_update(self.actor.parameters(), self.actor_target.parameters(), self.tau)
        self.check_parameters()
        self.last_losses = {"critic_loss": float(np.mean(critic_losses))} if critic_losses else {}
        if actor_losses:
            self.last_losses["actor_loss"] = float(np.mean(actor_losses))

    def check_parameters(self) -> None:
        """Raise ``CriticDivergedError`` naming the first non-finite parameter (actor, critics, targets)."""
        for name, value in self.policy.state_dict().items():
            if not torch.isfinite(value).all():
                raise CriticDivergedError(f"parameter {name} is not finite: the actor-critic diverged")

    def save_checkpoint(self, path: str | Path) -> None:
        """Write actor and critic weights (safetensors) after checking every parameter is finite."""
        self.check_parameters()
        tensors = {
            name: value.detach().cpu().contiguous() for name, value in self.policy.state_dict().items()
        }
        metadata = {
            "config": self.config.model_dump_json(),
            "state_dim": str(self.state_dim),
            "action_dim": str(self.action_dim),
        }
        save_file(tensors, str(path), metadata=metadata)

    def training_state(self) -> dict[str, Any]:
        """Everything a resumed learner needs to continue bit for bit: weights (targets and state normalization
        included), both optimizers, the filled part of the replay buffer, the update counter and random state
        (SB3 samples replay indices from numpy's global generator)."""
        demo = {"demo_replay": _replay_state(self.demo_buffer)} if self.demo_buffer is not None else {}
        return demo | {
            "policy": {name: value.detach().cpu() for name, value in self.policy.state_dict().items()},
            "actor_optimizer": self.actor.optimizer.state_dict(),
            "critic_optimizer": self.critic.optimizer.state_dict(),
            "replay": _replay_state(self.replay_buffer),
            "n_updates": int(self._n_updates),
            "rng": capture_rng(None, self.dropout_generator) | {"numpy_global": np.random.get_state()},
        }

    def restore_training_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`training_state` output (a learner built with the same config)."""
        self.policy.load_state_dict(state["policy"])
        self.actor.optimizer.load_state_dict(state["actor_optimizer"])
        self.critic.optimizer.load_state_dict(state["critic_optimizer"])
        _restore_replay(self.replay_buffer, state["replay"])
        if self.demo_buffer is not None and "demo_replay" in state:
            _restore_replay(self.demo_buffer, state["demo_replay"])
        self._n_updates = int(state["n_updates"])
        restore_rng(state["rng"], None, self.dropout_generator)
        np.random.set_state(state["rng"]["numpy_global"])

    def save_training_state(self, path: str | Path) -> Path:
        """Atomically write :meth:`training_state` to ``path`` (the learners' one state format)."""
        self.check_parameters()
        return save_state(
            path,
            {
                "learner": self.training_state(),
                "config": self.config.model_dump(mode="json"),
                "dims": (self.state_dim, self.action_dim),
            },
        )

    @classmethod
    def resume(cls, path: str | Path, device: str | None = None) -> ChunkedTD3 | None:
        """A learner continued from :meth:`save_training_state` output, or None when ``path`` holds none yet."""
        state = load_state(path)
        if state is None:
            return None
        config = LearnerConfig(**state["config"] | ({"device": device} if device else {}))
        learner = cls(*state["dims"], config)
        learner.restore_training_state(state["learner"])
        return learner

    @classmethod
    def load_checkpoint(cls, path: str | Path, device: str = "cpu") -> ChunkedTD3:
        """Rebuild a learner (empty replay) from ``save_checkpoint`` output, on ``device``."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        raw = json.loads(metadata["config"])
        tensors = load_file(str(path))
        legacy = "normalize_state" not in raw  # written before state normalization: raw states, no buffers
        config = LearnerConfig(**raw | {"normalize_state": not legacy, "device": device})
        learner = cls(int(metadata["state_dim"]), int(metadata["action_dim"]), config)
        if legacy:
            identity = {k: v for k, v in learner.policy.state_dict().items() if ".features_extractor." in k}
            tensors = {**identity, **tensors}
        learner.policy.load_state_dict(tensors)
        return learner


#: The replay buffer's per-transition arrays (SB3's and the chunk buffer's own).
_REPLAY_ARRAYS = (
    "observations",
    "next_observations",
    "actions",
    "rewards",
    "dones",
    "discounts",
    "interventions",
)


def _replay_state(buffer: ChunkReplayBuffer) -> dict[str, Any]:
    size = buffer.size()
    return {name: getattr(buffer, name)[:size].copy() for name in _REPLAY_ARRAYS} | {
        "pos": buffer.pos,
        "full": buffer.full,
    }


def _restore_replay(buffer: ChunkReplayBuffer, replay: dict[str, Any]) -> None:
    for name in _REPLAY_ARRAYS:
        getattr(buffer, name)[: len(replay[name])] = replay[name]
    buffer.pos, buffer.full = int(replay["pos"]), bool(replay["full"])


def _finite(name: str, loss: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(loss):
        raise CriticDivergedError(f"{name} is {loss.item()}: the actor-critic diverged; training stopped")
    return loss


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
