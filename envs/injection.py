"""Known-bad data: a wrapper that injects bad segments into any policy's rollouts, with a per-step ground truth.

``BadSegmentWrapper`` sits between the acting policy and the env. At every step where no segment is running, a
segment starts with probability ``InjectionConfig.rate`` (a per-step start probability); it lasts ``length``
steps (fewer if the episode ends) and overrides the policy's action by one of ``kinds``, drawn uniformly when
the segment starts:

- ``detour``: the hand moves straight away from the goal at speed ``scale`` (Meta-World envs only: the hand
  and goal positions are read from the privileged state, see ``envs.metaworld_env.HAND`` / ``GOAL``),
- ``random``: the hand moves in one random direction (drawn at the segment's start) at speed ``scale``,
- ``pause``: the hand holds still.

On Meta-World the gripper action stays the policy's (a detour does not drop what the robot holds); on any other
env with a ``Box`` action space every dimension moves (``random``: the box centre plus ``scale`` times a random
unit direction times the half-range; ``pause``: the box centre). Every step's ``info`` carries
``injected`` (the segment's kind, ``None`` on a clean step: the ground truth the recorder stores as
``EpisodeRecord.injected``), ``policy_action`` (what the policy proposed) and ``executed_action`` (what ran).

Wrap it *outside* an ``envs.interventions.InterventionWrapper``: the human then sees the injected action as the
robot's, and a step the human takes over is not injected (``injected`` None; the running segment ends there).
Seeding: ``reset(seed=s)`` reseeds the segment draws from ``(config.seed, s)``, so an episode's injections are
a function of the two seeds; ``reset()`` without a seed continues the stream.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.types import Observation, StepSource
from envs.metaworld_env import GOAL, HAND, MetaWorldEnv

InjectionKind = Literal["detour", "random", "pause"]
INJECTED_KEY = "injected"
"""The ``info`` key of a step's injected kind (``None`` on a clean step)."""


class InjectionConfig(BaseModel):
    """Which bad segments are injected, how often and for how long (validated; unknown fields are rejected).

    ``rate`` is the per-step probability that a segment starts (on steps outside a segment): with ``rate`` r and
    ``length`` L about ``rL / (1 + rL)`` of an unbounded episode's steps are injected.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kinds: tuple[InjectionKind, ...] = Field(default=("detour",), min_length=1)
    rate: float = Field(default=0.02, ge=0.0, le=1.0)
    length: int = Field(default=15, ge=1)
    scale: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0)

    @field_validator("kinds")
    @classmethod
    def _distinct(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds: expected distinct kinds, got {list(kinds)}")
        return kinds


class BadSegmentWrapper(gym.Wrapper):
    """Overrides the policy's action during randomly started bad segments; ``info["injected"]`` says where."""

    def __init__(self, env: gym.Env, config: InjectionConfig | None = None) -> None:
        super().__init__(env)
        self.config = config or InjectionConfig()
        space = env.action_space
        if not isinstance(space, gym.spaces.Box):
            raise ValueError(f"injection: needs a Box action space, got {type(space).__name__}")
        self._metaworld = isinstance(env.unwrapped, MetaWorldEnv)
        if "detour" in self.config.kinds and not self._metaworld:
            raise ValueError(
                "injection.kinds: 'detour' needs a Meta-World env (a goal to move away from); "
                "use 'random' or 'pause' for other envs"
            )
        self._low, self._high = space.low.astype(np.float32), space.high.astype(np.float32)
        self._rng = np.random.default_rng(self.config.seed)
        self._observation: Observation | None = None
        self._kind: str | None = None
        self._remaining = 0
        self._direction = np.zeros(0, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset the env; ``seed`` (if given) reseeds the segment draws; no segment is running afterwards."""
        observation, info = self.env.reset(seed=seed, options=options)
        if seed is not None:
            self._rng = np.random.default_rng([self.config.seed, seed])
        self._observation, self._kind, self._remaining = observation, None, 0
        return observation, {**info, INJECTED_KEY: None}

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Run ``action``, or the running (or newly started) segment's action instead; annotate ``info``."""
        if self._observation is None:
            raise RuntimeError("step() called before reset()")
        policy_action = np.asarray(action, dtype=np.float32).reshape(-1)
        kind = self._segment_kind()
        executed = policy_action if kind is None else self._bad_action(kind, policy_action)
        observation, reward, terminated, truncated, info = self.env.step(executed)
        if int(info.get("source", StepSource.POLICY)) == StepSource.HUMAN:
            kind, self._kind, self._remaining = None, None, 0  # the human acted: nothing injected, segment over
        else:
            info = {**info, "executed_action": info.get("executed_action", executed)}
        self._observation = observation
        return observation, reward, terminated, truncated, {
            **info,
            INJECTED_KEY: kind,
            "policy_action": policy_action,
        }

    def _segment_kind(self) -> str | None:
        """The kind of the segment this step belongs to (starting one with probability ``rate``), or None."""
        if self._remaining == 0:
            if self.config.rate == 0 or self._rng.random() >= self.config.rate:
                return None
            self._kind = str(self.config.kinds[int(self._rng.integers(len(self.config.kinds)))])
            self._remaining = self.config.length
            self._direction = self._unit(self._moving_dims())
        self._remaining -= 1
        return self._kind

    def _moving_dims(self) -> int:
        return 3 if self._metaworld else self._low.shape[0]

    def _unit(self, dims: int) -> np.ndarray:
        vector = self._rng.normal(size=dims)
        return (vector / max(float(np.linalg.norm(vector)), 1e-9)).astype(np.float32)

    def _bad_action(self, kind: str, policy_action: np.ndarray) -> np.ndarray:
        """The action that replaces ``policy_action`` in a segment of ``kind``."""
        scale = self.config.scale
        if not self._metaworld:
            centre, half = (self._high + self._low) / 2, (self._high - self._low) / 2
            move = np.zeros_like(centre) if kind == "pause" else scale * self._direction * half
            return np.clip(centre + move, self._low, self._high).astype(np.float32)
        action = policy_action.copy()
        if kind == "pause":
            action[:3] = 0.0
        elif kind == "random":
            action[:3] = scale * self._direction
        else:
            privileged = np.asarray(self._observation["privileged"], dtype=np.float32)
            away = privileged[HAND] - privileged[GOAL]
            action[:3] = scale * away / max(float(np.linalg.norm(away)), 1e-9)
        return np.clip(action, self._low, self._high).astype(np.float32)
