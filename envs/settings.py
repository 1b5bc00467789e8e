"""The one env settings model: how a task name becomes an env, for collection, training, evaluation and pipelines.

A task name is a Meta-World task (``reach-v3``) or any gymnasium env: a registered id (``Reacher-v5``),
gymnasium's ``module:EnvId`` or ``module:Class``. ``EnvSettings`` holds what is shared by every stage (cameras,
image size, episode limit), for a Meta-World task which parts of its observation are the ``state``
(``state_parts``, see ``envs.metaworld_env.STATE_PARTS``; the state tier needs the object for object tasks)
and, for a gymnasium env, how to make and read it (constructor ``kwargs``, the ``success_key``/
``success_threshold`` that declare success, ``state_keys``/``image_keys`` for a ``Dict`` observation, the prompt
and robot type). ``EnvSettings.env(task, seed)`` is the ``EnvConfig`` or
``GymEnvConfig`` to build. The same fields are the ``env:`` block of a pipeline config and the YAML file of
``--env`` on ``flywheel collect``, ``train``, ``recap iterate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from envs.gym_adapter import GymEnvConfig, env_entry
from envs.metaworld_env import EnvConfig
from envs.tasks import TASK_PROMPTS, UnknownTaskError, resolve_task

#: Camera of a gymnasium env's rendered frame when none is configured.
GYM_CAMERA = "main"
#: Settings that only a gymnasium env takes.
GYM_ONLY = ("kwargs", "success_key", "success_threshold", "state_keys", "image_keys", "robot_type")


def is_metaworld_task(name: str) -> bool:
    """Whether ``name`` is a Meta-World v3 task (else it names a gymnasium env)."""
    return name in TASK_PROMPTS


def resolve_env_name(name: str) -> str:
    """``name`` if it is a Meta-World task or a gymnasium env flywheel can make; else a one-line ``ValueError``."""
    if is_metaworld_task(name):
        return name
    looks_metaworld = name == name.lower() and ":" not in name and "/" not in name
    try:
        env_entry(name)
    except ValueError as error:
        if looks_metaworld:
            try:
                resolve_task(name)
            except UnknownTaskError as unknown:
                raise ValueError(str(unknown).removeprefix("task: ")) from None
        raise ValueError(str(error).removeprefix("env_id: ")) from None
    return name


class EnvSettings(BaseModel):
    """Camera, image size and episode length shared by collection, training and evaluation, and how a gymnasium
    env is made and read (see the module doc). ``cameras=None``: ``corner2`` (Meta-World) / ``main`` (a gymnasium
    env's rendered frame, or its ``image_keys`` cameras when it has some); ``()``: no images (the state-input
    tier)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cameras: tuple[str, ...] | None = None
    image_size: int = Field(default=64, ge=16, le=512)
    max_episode_steps: int | None = Field(default=None, ge=1)
    prompt: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    success_key: str = "success"
    success_threshold: float | None = None
    state_keys: tuple[str, ...] | None = None
    image_keys: dict[str, str] = Field(default_factory=dict)
    robot_type: str | None = None
    state_parts: tuple[str, ...] | None = None

    def env(self, task: str, seed: int = 0, render: bool = True) -> EnvConfig | GymEnvConfig:
        """The env of ``task`` with these settings (``render=False``: no camera images)."""
        if is_metaworld_task(task):
            default = EnvSettings()  # a dumped and reloaded config sets every field: compare values
            given = sorted(name for name in GYM_ONLY if getattr(self, name) != getattr(default, name))
            if given:
                raise ValueError(f"{given[0]}: applies to gymnasium envs, not the Meta-World task {task!r}")
            cameras = ("corner2",) if self.cameras is None else self.cameras
            return EnvConfig(
                task=task,
                width=self.image_size,
                height=self.image_size,
                max_episode_steps=self.max_episode_steps,
                seed=seed,
                prompt=self.prompt,
                **({"state_parts": self.state_parts} if self.state_parts else {}),
                **({"cameras": cameras, "render": render} if cameras else {"render": False}),
            )
        if self.state_parts is not None:
            raise ValueError(f"state_parts: applies to Meta-World tasks, not the gymnasium env {task!r}")
        cameras = (tuple(self.image_keys) or (GYM_CAMERA,)) if self.cameras is None else self.cameras
        rendered = [camera for camera in cameras if camera not in self.image_keys]
        if len(rendered) > 1:
            raise ValueError(
                f"cameras: a gymnasium env renders one frame; {', '.join(rendered)} are not in image_keys"
            )
        return GymEnvConfig(
            env_id=task,
            kwargs=self.kwargs,
            prompt=self.prompt or "",
            render=render and bool(rendered),
            camera=rendered[0] if rendered else GYM_CAMERA,
            width=self.image_size,
            height=self.image_size,
            max_episode_steps=self.max_episode_steps,
            seed=seed,
            success_key=self.success_key,
            success_threshold=self.success_threshold,
            state_keys=self.state_keys,
            image_keys={
                camera: key for camera, key in self.image_keys.items() if camera in cameras and render
            },
            robot_type=self.robot_type,
        )

    def camera_names(self, task: str) -> tuple[str, ...]:
        """The cameras ``task``'s env renders with these settings (``()``: none, the state tier)."""
        return () if self.cameras == () else tuple(self.env(task).cameras)

    def for_model(self, cameras: tuple[str, ...], image_size: int) -> EnvSettings:
        """These settings rendering what a model reads: its ``cameras`` at ``image_size``."""
        return self.model_copy(update={"cameras": tuple(cameras), "image_size": image_size})

    @classmethod
    def from_file(cls, path: str | Path) -> EnvSettings:
        """Read settings from a YAML (or JSON) file of these fields; a one-line ``ValueError`` if invalid."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--env: {path} is not a file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"--env: {path} is not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--env: {path}: expected a mapping of settings, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "settings"
            raise ValueError(f"--env: {path}: {where}: {first['msg']}") from None
