"""Scripted experts for gymnasium's own MuJoCo envs: demonstrators for a non-Meta-World env.

``ReacherExpert`` drives gymnasium's ``Reacher-v5`` (a two-link planar arm) with a Jacobian-transpose
controller on its 10-D observation, read from ``batch["state"]`` (what ``envs.GymAdapterEnv`` puts there):
``[cos q0, cos q1, sin q0, sin q1, target x, target y, q̇0, q̇1, (fingertip − target) x, y]``. Loaded as the
policy spec ``python:policies.gym_experts:ReacherExpert[?noise_std=0.3]`` (``experiments.policy_loader``).
"""

from __future__ import annotations

import time

import numpy as np

from policies.base import ActionChunk, ObservationBatch

#: Reacher-v5's link lengths (m): shoulder to elbow, elbow to fingertip.
REACHER_LINKS = (0.1, 0.11)
REACHER_STATE_DIM = 10


class ReacherExpert:
    """A noisy PD controller in task space for ``Reacher-v5`` (``B×H×2`` chunks; H = 1 is closed loop)."""

    action_dim = 2

    def __init__(
        self,
        noise_std: float = 0.0,
        seed: int = 0,
        gain: float = 200.0,
        damping: float = 0.1,
        action_horizon: int = 1,
        version: str | None = None,
    ) -> None:
        self.noise_std = float(noise_std)
        self.gain, self.damping = float(gain), float(damping)
        self.action_horizon = int(action_horizon)
        self.version = version or f"reacher-expert-noise{self.noise_std:g}"
        self._rng = np.random.default_rng(seed)

    def clean_action(self, state: np.ndarray) -> np.ndarray:
        """The controller's torque for one 10-D observation: ``Jᵀ·k·(target − tip) − c·q̇``, clipped to [-1, 1]."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (REACHER_STATE_DIM,):
            raise ValueError(f"state: expected Reacher-v5's {REACHER_STATE_DIM}-D observation, got {state.shape}")
        q0 = np.arctan2(state[2], state[0])
        q01 = q0 + np.arctan2(state[3], state[1])
        first, second = REACHER_LINKS
        jacobian = np.array(
            [
                [-first * np.sin(q0) - second * np.sin(q01), -second * np.sin(q01)],
                [first * np.cos(q0) + second * np.cos(q01), second * np.cos(q01)],
            ]
        )
        torque = self.gain * jacobian.T @ (-state[8:10]) - self.damping * state[6:8]
        return np.clip(torque, -1.0, 1.0).astype(np.float32)

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        """One chunk per observation from ``batch["state"]`` (the action held H times, fresh noise each)."""
        started = time.perf_counter()
        states = np.asarray(batch["state"])
        actions = np.empty((len(states), self.action_horizon, self.action_dim), dtype=np.float32)
        for row, state in enumerate(states):
            clean = self.clean_action(state)
            noise = self._rng.normal(0.0, self.noise_std, (self.action_horizon, self.action_dim))
            actions[row] = np.clip(clean + noise, -1.0, 1.0)
        return ActionChunk(actions=actions, timing={"infer_ms": (time.perf_counter() - started) * 1e3})

    def reset(self) -> None:
        """Stateless between episodes (the noise stream continues)."""
