"""Any registered gymnasium env as a flywheel env, by configuration alone.

The wrapped env's observation is flattened (``gymnasium.spaces.flatten``, so Box, Dict and Tuple
observations all work) into the ``float32`` ``state``; ``privileged`` carries the same vector. With
``render=True`` the env is made with ``render_mode="rgb_array"`` and its frame is returned as
``images[camera]`` (resized if the env ignores ``width``/``height``). The prompt comes from the config.
``info["success"]`` is read from ``success_key`` in the env's info (``False`` when absent). MuJoCo envs
render with shadows and multisampling off, from any thread (see ``envs.rendering``)."""

from __future__ import annotations

import os
import string
import weakref
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from envs.rendering import configure_fast_rendering, release_current_context
from envs.tasks import closest_names
from policies.base import Observation


class GymEnvConfig(BaseModel):
    """Configuration of a generic gymnasium env (validated; unknown fields are rejected)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    env_id: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    prompt: str = ""
    render: bool = False
    camera: str = "main"
    width: int = Field(default=96, ge=16, le=1024)
    height: int = Field(default=96, ge=16, le=1024)
    max_episode_steps: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)
    success_key: str = "success"

    @field_validator("env_id")
    @classmethod
    def _registered(cls, env_id: str) -> str:
        if env_id not in gym.registry:
            suggestions = ", ".join(closest_names(env_id, list(gym.registry)))
            raise ValueError(f"env_id: unknown gymnasium env {env_id!r}; closest names: {suggestions}")
        return env_id


class GymAdapterEnv(gym.Env):
    """Wraps ``gymnasium.make(config.env_id, **config.kwargs)`` to return flywheel ``Observation`` dicts."""

    metadata = {"render_modes": ["rgb_array"]}  # noqa: RUF012 (gymnasium's class attribute)

    def __init__(self, config: GymEnvConfig) -> None:
        self.config = config
        self.task = config.env_id
        self.prompt = config.prompt or config.env_id
        self.render_mode = "rgb_array"
        self._env = _make(config)
        # Close the wrapped env (and its GL context) when the adapter goes away, at the latest before exit.
        self._finalizer = weakref.finalize(self, self._env.close)
        self._seeded = False
        self._last_image: np.ndarray | None = None
        self.action_space = self._env.action_space
        state_dim = gym.spaces.flatdim(self._env.observation_space)
        vector = gym.spaces.Box(-np.inf, np.inf, shape=(state_dim,), dtype=np.float32)
        image = gym.spaces.Box(0, 255, shape=(config.height, config.width, 3), dtype=np.uint8)
        self.observation_space = gym.spaces.Dict(
            {
                "images": gym.spaces.Dict({config.camera: image} if config.render else {}),
                "state": vector,
                "prompt": gym.spaces.Text(max_length=512, charset=string.printable),
                "privileged": vector,
            }
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        """Start an episode (the first reset without a seed uses ``config.seed``)."""
        super().reset(seed=seed)
        if seed is None and not self._seeded:
            seed = self.config.seed
        if seed is not None:
            self._env.action_space.seed(seed)
            self._seeded = True
        raw, info = self._env.reset(seed=seed, options=options)
        return self._observation(raw), {**info, "success": bool(info.get(self.config.success_key, False))}

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Step the wrapped env; ``info["success"]`` is a bool."""
        raw, reward, terminated, truncated, info = self._env.step(action)
        info = {**info, "success": bool(info.get(self.config.success_key, False))}
        return self._observation(raw), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray | None:
        """The latest frame (``None`` when rendering is off)."""
        return self._last_image

    def close(self) -> None:
        """Close the wrapped env (idempotent)."""
        self._finalizer()

    def _observation(self, raw: Any) -> Observation:
        vector = gym.spaces.flatten(self._env.observation_space, raw).astype(np.float32)
        images = {}
        if self.config.render:
            self._last_image = self._frame()
            images[self.config.camera] = self._last_image
        return Observation(images=images, state=vector, prompt=self.prompt, privileged=vector.copy())

    def _frame(self) -> np.ndarray:
        frame = np.asarray(self._render(), dtype=np.uint8)[..., :3]
        if frame.shape[:2] != (self.config.height, self.config.width):
            resized = Image.fromarray(frame).resize((self.config.width, self.config.height), Image.BILINEAR)
            frame = np.asarray(resized)
        return np.ascontiguousarray(frame)

    def _render(self) -> Any:
        """The wrapped env's frame, from any thread: a gymnasium MuJoCo env's GL context is made current on this
        thread for the frame and released after it (gymnasium binds it once, to the thread of the first frame)."""
        renderer = getattr(self._env.unwrapped, "mujoco_renderer", None)
        if renderer is None:
            return self._env.render()
        if renderer.viewer is not None:
            renderer.viewer.make_context_current()
        try:
            return self._env.render()
        finally:
            release_current_context()


def _make(config: GymEnvConfig) -> gym.Env:
    """Make the wrapped env, asking for the configured frame size where the env accepts it."""
    kwargs = dict(config.kwargs)
    if config.max_episode_steps is not None:
        kwargs["max_episode_steps"] = config.max_episode_steps
    if config.render:
        kwargs["render_mode"] = "rgb_array"
        try:
            env = gym.make(config.env_id, width=config.width, height=config.height, **kwargs)
        except TypeError:  # envs without a frame-size argument: frames are resized instead
            env = gym.make(config.env_id, **kwargs)
    else:
        env = gym.make(config.env_id, **kwargs)
    model = getattr(env.unwrapped, "model", None)
    if model is not None and hasattr(model, "vis"):
        configure_fast_rendering(model, config.width, config.height)
    return env
