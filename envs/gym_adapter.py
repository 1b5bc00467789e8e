"""Any gymnasium env as a flywheel env, by configuration alone.

The env is named by a registered gymnasium id, gymnasium's ``module:EnvId`` or ``module:Class`` (see
``GymEnvConfig``). Its observation becomes the ``float32`` ``state`` (flattened with ``gymnasium.spaces.flatten``;
a ``Dict`` observation's chosen keys, its image entries becoming cameras); ``privileged`` carries the same
vector. With ``render=True`` the env is made with ``render_mode="rgb_array"`` and its frame is returned as
``images[camera]`` (resized if the env ignores ``width``/``height``). The prompt comes from the config.
``info["success"]`` is read from ``success_key`` in the env's info (``False`` when absent), optionally against a
threshold. MuJoCo envs render with shadows and multisampling off, from any thread (see ``envs.rendering``)."""

from __future__ import annotations

import importlib
import os
import string
import weakref
from collections.abc import Callable
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.types import Observation
from envs.rendering import configure_fast_rendering, release_current_context
from envs.tasks import closest_names


class GymEnvConfig(BaseModel):
    """Configuration of a generic gymnasium env (validated; unknown fields are rejected).

    ``env_id`` names the env three ways: a registered gymnasium id (``Pusher-v5``), gymnasium's ``module:EnvId``
    (the module is imported first, registering the id — how an env registered in the user's package reaches a
    Ray worker), or ``module:Class`` (an env class or factory, called with ``kwargs``). A ``Dict`` observation
    maps to flywheel's: ``state_keys`` (default: every key holding no image) are flattened into ``state``,
    ``image_keys`` maps camera names to image entries (``H×W×3`` uint8; dotted for nested dicts, e.g.
    ``pixels.top``); with ``render`` the env's ``rgb_array`` frame is one more camera, ``camera``. Success is
    ``info[success_key]`` (as a bool), or ``info[success_key] >= success_threshold`` when a threshold is declared
    (e.g. Reacher's ``reward_dist``, the negative fingertip–target distance).
    """

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
    success_threshold: float | None = None
    state_keys: tuple[str, ...] | None = None
    image_keys: dict[str, str] = Field(default_factory=dict)
    robot_type: str | None = None

    @field_validator("env_id")
    @classmethod
    def _known(cls, env_id: str) -> str:
        env_entry(env_id)  # ValueError naming the closest registered ids, or what failed to import
        return env_id

    @property
    def task(self) -> str:
        """The name episodes of this env are stored under (the env id as given)."""
        return self.env_id

    @property
    def instruction(self) -> str:
        """The prompt episodes run under (the env id unless configured)."""
        return self.prompt or self.env_id

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera names of the observations: the rendered frame (with ``render``), then the image keys."""
        return ((self.camera,) if self.render else ()) + tuple(self.image_keys)

    @property
    def episode_steps(self) -> int:
        """The effective episode limit: ``max_episode_steps``, else the registered one (0 when there is none)."""
        if self.max_episode_steps is not None:
            return self.max_episode_steps
        entry = env_entry(self.env_id)
        return (entry.max_episode_steps or 0) if isinstance(entry, EnvSpec) else 0

    @property
    def robot_name(self) -> str:
        """``robot_type``, else the env's name without namespace, module or version (``Reacher``)."""
        if self.robot_type:
            return self.robot_type
        name = self.env_id.rpartition(":")[2].rpartition("/")[2]
        return name.rsplit("-v", 1)[0] if name.rsplit("-v", 1)[-1].isdigit() else name


def env_entry(env_id: str) -> EnvSpec | Callable[..., gym.Env]:
    """What ``env_id`` names: a registered ``EnvSpec`` (also after importing ``module`` of ``module:EnvId``) or
    the env class/factory of ``module:Class``. Raises a one-line ``ValueError``."""
    module_name, colon, name = env_id.rpartition(":")
    if colon:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"env_id: {env_id!r}: cannot import module {module_name!r} ({error})") from None
        if name in gym.registry:
            return gym.registry[name]
        entry = getattr(module, name, None)
        if callable(entry):
            return entry
        raise ValueError(
            f"env_id: {env_id!r}: {module_name} registers no gymnasium id {name!r} and has no env class {name!r}"
        )
    if env_id not in gym.registry:
        suggestions = ", ".join(closest_names(env_id, list(gym.registry)))
        raise ValueError(f"env_id: unknown gymnasium env {env_id!r}; closest names: {suggestions}")
    return gym.registry[env_id]


class GymAdapterEnv(gym.Env):
    """Wraps the env ``config.env_id`` names (made with ``config.kwargs``) to return flywheel ``Observation`` dicts."""

    metadata = {"render_modes": ["rgb_array"]}  # noqa: RUF012 (gymnasium's class attribute)

    def __init__(self, config: GymEnvConfig) -> None:
        self.config = config
        self.task = config.task
        self.prompt = config.instruction
        self.robot_type = config.robot_name
        self.render_mode = "rgb_array"
        self._env = _make(config)
        fps = self._env.metadata.get("render_fps")
        self.fps = float(fps) if isinstance(fps, int | float) and fps > 0 else None  # the env's control rate
        # Close the wrapped env (and its GL context) when the adapter goes away, at the latest before exit.
        self._finalizer = weakref.finalize(self, self._env.close)
        self._seeded = False
        self._last_image: np.ndarray | None = None
        self.action_space = self._env.action_space
        self._layout = ObservationLayout(self._env.observation_space, config)
        vector = gym.spaces.Box(-np.inf, np.inf, shape=(self._layout.state_dim,), dtype=np.float32)
        images = dict(self._layout.image_spaces)
        if config.render:
            images[config.camera] = gym.spaces.Box(0, 255, shape=(config.height, config.width, 3), dtype=np.uint8)
        self.observation_space = gym.spaces.Dict(
            {
                "images": gym.spaces.Dict(images),
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
        return self._observation(raw), {**info, "success": self._success(info)}

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Step the wrapped env; ``info["success"]`` is a bool."""
        raw, reward, terminated, truncated, info = self._env.step(action)
        info = {**info, "success": self._success(info)}
        return self._observation(raw), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray | None:
        """The latest frame (``None`` when rendering is off)."""
        return self._last_image

    def close(self) -> None:
        """Close the wrapped env (idempotent)."""
        self._finalizer()

    def _success(self, info: dict[str, Any]) -> bool:
        value = info.get(self.config.success_key, False)
        if self.config.success_threshold is None:
            return bool(value)
        return bool(float(value) >= self.config.success_threshold)

    def _observation(self, raw: Any) -> Observation:
        vector = self._layout.state(raw)
        images = self._layout.images(raw)
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


class ObservationLayout:
    """Maps the wrapped env's observations to flywheel's ``state`` vector and camera images.

    A ``Dict`` observation: ``config.state_keys`` (default: every top-level key holding no image) are
    flattened in order into the state, ``config.image_keys`` (camera → dotted key) are the images. Any other
    observation is flattened whole (``gymnasium.spaces.flatten``: Box, Tuple, Discrete, …).
    """

    def __init__(self, space: gym.spaces.Space, config: GymEnvConfig) -> None:
        self.space = space
        self.image_keys = dict(config.image_keys)
        if not isinstance(space, gym.spaces.Dict):
            if config.state_keys or config.image_keys:
                raise ValueError(
                    f"state_keys/image_keys: {config.env_id} has a {type(space).__name__} observation, not a Dict"
                )
            self.state_keys: tuple[str, ...] | None = None
            self.state_dim = gym.spaces.flatdim(space)
            self.image_spaces: dict[str, gym.spaces.Box] = {}
            return
        self.image_spaces = {camera: _image_space(space, key) for camera, key in self.image_keys.items()}
        image_roots = {key.split(".")[0] for key in self.image_keys.values()}
        if config.state_keys is None:
            keys = tuple(k for k in space.spaces if k not in image_roots and not _holds_image(space[k]))
        else:
            keys = config.state_keys
        missing = [key for key in keys if key not in space.spaces]
        if missing:
            raise ValueError(f"state_keys: {missing[0]!r} is not an observation key; keys: {', '.join(space.spaces)}")
        self.state_keys = keys
        self.state_dim = sum(gym.spaces.flatdim(space[key]) for key in keys)

    def state(self, raw: Any) -> np.ndarray:
        """The float32 state vector of one observation."""
        if self.state_keys is None:
            return gym.spaces.flatten(self.space, raw).astype(np.float32)
        parts = [gym.spaces.flatten(self.space[key], raw[key]).astype(np.float32) for key in self.state_keys]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def images(self, raw: Any) -> dict[str, np.ndarray]:
        """The configured image entries of one observation, C-contiguous uint8."""
        return {camera: np.ascontiguousarray(_lookup(raw, key), dtype=np.uint8) for camera, key in self.image_keys.items()}


def _is_image(space: gym.spaces.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3 and space.shape[2] == 3


def _holds_image(space: gym.spaces.Space) -> bool:
    """An image, or a Dict/Tuple with one inside (left out of the default state)."""
    if isinstance(space, gym.spaces.Dict | gym.spaces.Tuple):
        return any(_holds_image(sub) for sub in (space.spaces.values() if isinstance(space, gym.spaces.Dict) else space))
    return _is_image(space)


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def _image_space(space: gym.spaces.Dict, key: str) -> gym.spaces.Box:
    try:
        found = _lookup(space, key)
    except KeyError:
        raise ValueError(f"image_keys: {key!r} is not an observation key; keys: {', '.join(space.spaces)}") from None
    if not _is_image(found):
        raise ValueError(f"image_keys: {key!r} is {found}, not an H×W×3 uint8 image")
    return found


def _make(config: GymEnvConfig) -> gym.Env:
    """Make the wrapped env, asking for the configured frame size where the env accepts it."""
    kwargs = dict(config.kwargs)
    if config.render:
        kwargs["render_mode"] = "rgb_array"
    sized = {"width": config.width, "height": config.height} if config.render else {}
    try:
        env = _construct(config, kwargs | sized)
    except TypeError:  # envs without a frame-size argument: frames are resized instead
        if not sized:
            raise
        env = _construct(config, kwargs)
    model = getattr(env.unwrapped, "model", None)
    if model is not None and hasattr(model, "vis"):
        configure_fast_rendering(model, config.width, config.height)
    return env


def _construct(config: GymEnvConfig, kwargs: dict[str, Any]) -> gym.Env:
    """``gymnasium.make`` for a registered id (or ``module:EnvId``), else the class, in a time limit if asked."""
    entry = env_entry(config.env_id)
    if isinstance(entry, EnvSpec):
        limit = {"max_episode_steps": config.max_episode_steps} if config.max_episode_steps else {}
        return gym.make(config.env_id, **limit, **kwargs)
    env = entry(**kwargs)
    if config.max_episode_steps is not None:
        env = gym.wrappers.TimeLimit(env, config.max_episode_steps)
    return env
