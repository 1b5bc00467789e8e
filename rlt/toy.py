"""A 2-D point-reaching task with a biased chunking prior: small, fast and hard for the prior alone.

The point moves by ``step_size · a`` per step; success means ending within ``tolerance`` of the goal. The
prior plans an open-loop chunk toward ``goal + bias`` (plus Gaussian noise), so with a tolerance tighter than
``‖bias‖`` it rarely succeeds — the precision-critical last centimetres are what RLT has to learn. Used by the
RLT tests and as a smoke benchmark; observations follow flywheel's ``Observation`` contract.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from policies.base import ActionChunk, Observation, ObservationBatch
from rlt.online import OnlineConfig, OnlineRLT
from rlt.phase import DistanceSwitch
from rlt.rl_token import RLToken, RLTokenConfig
from rlt.state import EmbeddingPrior, StateProjectionEmbedder
from rlt.td3 import LearnerConfig

#: Width of the toy's state ``(x, y, goal_x, goal_y)``.
PROPRIO_DIM = 4


class PointReachEnv(gym.Env):
    """State and privileged state are ``(x, y, goal_x, goal_y)``; sparse reward +1 on success (terminates).

    The point starts 0.15–0.4 on the +x side of the goal, so a prior biased toward +x stops short of it. With
    ``image_size`` set, ``images["top"]`` shows the goal (green) and the point (red) on black, for image-based
    priors such as the built-in VLA.
    """

    def __init__(
        self,
        tolerance: float = 0.02,
        step_size: float = 0.05,
        max_steps: int = 60,
        image_size: int | None = None,
    ) -> None:
        self.tolerance, self.step_size, self.max_steps = tolerance, step_size, max_steps
        self.image_size = image_size
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.position = np.zeros(2, np.float32)
        self.goal = np.zeros(2, np.float32)
        self.steps = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict]:
        super().reset(seed=seed)
        self.goal = self.np_random.uniform(-0.5, 0.5, 2).astype(np.float32)
        offset = np.array([self.np_random.uniform(0.15, 0.4), self.np_random.uniform(-0.3, 0.3)])
        self.position = (self.goal + offset).astype(np.float32)
        self.steps = 0
        return self._observation(), {"success": False}

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict]:
        action = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        self.position = self.position + self.step_size * action
        self.steps += 1
        success = bool(np.linalg.norm(self.position - self.goal) < self.tolerance)
        truncated = self.steps >= self.max_steps and not success
        return self._observation(), float(success), success, truncated, {"success": success}

    def _observation(self) -> Observation:
        state = np.concatenate([self.position, self.goal]).astype(np.float32)
        images = {} if self.image_size is None else {"top": self._render()}
        return Observation(images=images, state=state, prompt="reach the goal", privileged=state.copy())

    def _render(self) -> np.ndarray:
        size = int(self.image_size or 0)
        image = np.zeros((size, size, 3), np.uint8)
        for point, channel in ((self.goal, 1), (self.position, 0)):
            row, col = np.clip(((point + 1.0) / 2.0 * (size - 1)).round().astype(int), 1, size - 2)
            image[row - 1 : row + 2, col - 1 : col + 2, channel] = 255
        return image


class BiasedReachPrior:
    """A ``Policy``: open-loop chunks toward ``goal + bias``, proportional gain, Gaussian action noise."""

    def __init__(
        self,
        bias: tuple[float, float] = (0.06, 0.0),
        noise: float = 0.1,
        horizon: int = 10,
        gain: float = 10.0,
        step_size: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.bias = np.asarray(bias, np.float32)
        self.noise, self.gain, self.step_size = noise, gain, step_size
        self.action_horizon, self.action_dim = horizon, 2
        self.version = f"biased-reach-prior(bias={tuple(bias)},noise={noise})"
        self.rng = np.random.default_rng(seed)

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        states = np.asarray(batch["state"], np.float32)
        position, target = states[:, :2].copy(), states[:, 2:4] + self.bias
        actions = np.zeros((len(states), self.action_horizon, 2), np.float32)
        for k in range(self.action_horizon):
            step = np.clip(self.gain * (target - position), -1.0, 1.0)
            actions[:, k] = np.clip(step + self.rng.normal(0.0, self.noise, step.shape), -1.0, 1.0)
            position = position + self.step_size * step
        return ActionChunk(actions=actions)

    def reset(self) -> None:
        """Stateless."""


def toy_online_loop(
    seed: int,
    learner: LearnerConfig,
    warmup_episodes: int = 20,
) -> OnlineRLT:
    """The toy task's RLT learner (its episodes: ``PointReachEnv``; ``actors.rlt_loop.RLTLoop`` plays them):
    biased prior with projected-state embeddings, hand-off within 0.15 of the goal. The embedder and the token's
    initial weights are the same for every seed; ``seed`` drives the prior's noise, the episodes and the
    learner."""
    torch.manual_seed(0)
    token = RLToken(RLTokenConfig(num_tokens=4, embed_dim=16, z_dim=16, model_dim=32, encoder_layers=1))
    prior = EmbeddingPrior(BiasedReachPrior(noise=0.1, seed=seed), StateProjectionEmbedder(4, 4, 16, seed=0))
    config = OnlineConfig(
        task="point-reach",
        warmup_episodes=warmup_episodes,
        total_env_steps=0,
        token_steps=50,
        record_images=False,
        seed=seed,
    )
    switch = DistanceSwitch([0, 1], [2, 3], 0.15)
    return OnlineRLT(prior, switch, token, config, learner, proprio_dim=PROPRIO_DIM)
