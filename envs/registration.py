"""Making flywheel envs: :func:`make_env` (the one factory), their gymnasium ids and the ``EnvSpec`` each carries.

Importing ``envs`` registers ``flywheel/<task>`` for every Meta-World v3 task, so ``gymnasium.make("flywheel/
reach-v3")`` (or ``gymnasium.make("envs:flywheel/reach-v3")`` from a fresh process) gives the ``MetaWorldEnv``
with flywheel observations. Every env ``envs.make_env`` builds carries its ``EnvSpec`` (``env.unwrapped.spec``):
id ``flywheel/<name>``, entry point :func:`make_flywheel_env`, and its whole config as kwargs, so
``gymnasium.make(spec)`` rebuilds the same env anywhere flywheel is installed — a gymnasium env named by
``GymEnvConfig`` too (its id is registered in the process that built it). Rollouts store the spec with each
episode (metadata ``env_spec``); dataset exports hand it on (Minari's ``recover_environment``).

``layout="flat"`` gives Minari's observation layout instead: ``{"state": …, <camera>: H×W×3, …}`` (no prompt or
privileged state), what ``flywheel export --format minari`` writes.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec

from envs.gym_adapter import GymAdapterEnv, GymEnvConfig
from envs.injection import BadSegmentWrapper, InjectionConfig
from envs.interventions import InterventionWrapper, SimulatedHuman, SimulatedHumanConfig
from envs.metaworld_env import EnvConfig, MetaWorldEnv
from envs.tasks import TASK_PROMPTS

NAMESPACE = "flywheel"
ENTRY_POINT = "envs.registration:make_flywheel_env"
Layout = Literal["flywheel", "flat"]


def make_env(
    config: EnvConfig | GymEnvConfig,
    human: SimulatedHumanConfig | None = None,
    inject: InjectionConfig | None = None,
) -> gym.Env:
    """A Meta-World env (``EnvConfig``) or any gymnasium env (``GymEnvConfig``) with flywheel observations.

    With ``human`` the env is wrapped in an ``InterventionWrapper`` whose ``SimulatedHuman`` is the task's
    scripted expert (Meta-World tasks only: generic envs have no expert). With ``inject`` a
    ``BadSegmentWrapper`` goes around that (the human sees the injected actions as the robot's). The env's
    ``unwrapped.spec`` is its :func:`env_spec`.
    """
    if isinstance(config, GymEnvConfig):
        if human is not None:
            raise ValueError(
                "human: simulated interventions need a Meta-World task (EnvConfig), not a GymEnvConfig"
            )
        env: gym.Env = GymAdapterEnv(config)
    else:
        env = MetaWorldEnv(config)
        if human is not None:
            env = InterventionWrapper(env, SimulatedHuman(config.task, human))
    env.unwrapped.spec = env_spec(config)  # gymnasium.make(spec) rebuilds it
    return env if inject is None else BadSegmentWrapper(env, inject)


def make_flywheel_env(
    config: dict[str, Any], layout: Layout = "flywheel", render_mode: str | None = None
) -> gym.Env:
    """The env a config dump names (``EnvConfig`` fields with ``task``, ``GymEnvConfig`` fields with
    ``env_id``), in flywheel's observation layout or Minari's flat one. ``render_mode`` is accepted for
    gymnasium's sake; cameras render into the observations as configured."""
    env = make_env(parse_env_config(config))
    return FlatObservation(env) if layout == "flat" else env


def parse_env_config(config: dict[str, Any]) -> EnvConfig | GymEnvConfig:
    """An env config from its ``model_dump`` (which kind: ``env_id`` says gymnasium, else Meta-World)."""
    return GymEnvConfig.model_validate(config) if "env_id" in config else EnvConfig.model_validate(config)


def gym_id(config: EnvConfig | GymEnvConfig) -> str:
    """The gymnasium id of a flywheel env: ``flywheel/<task>`` (a namespaced env id's ``/`` becomes ``.``)."""
    return f"{NAMESPACE}/{config.task.replace('/', '.')}"


def env_spec(config: EnvConfig | GymEnvConfig, layout: Layout = "flywheel") -> EnvSpec:
    """The spec ``gymnasium.make`` rebuilds this env from (its id is registered here if it is not yet)."""
    spec = EnvSpec(
        id=gym_id(config),
        entry_point=ENTRY_POINT,
        kwargs={"config": config.model_dump(mode="json"), "layout": layout},
        disable_env_checker=True,
    )
    if spec.id not in gym.registry:
        gym.register(
            spec.id,
            entry_point=ENTRY_POINT,
            kwargs={"config": spec.kwargs["config"]},
            disable_env_checker=True,
        )
    return spec


def spec_from_metadata(recorded: dict[str, Any] | str) -> EnvSpec:
    """An ``EnvSpec`` stored with an episode (metadata ``env_spec``)."""
    return EnvSpec.from_json(recorded if isinstance(recorded, str) else json.dumps(recorded))


def with_layout(spec: EnvSpec, layout: Layout) -> EnvSpec:
    """``spec`` giving observations in ``layout``."""
    return EnvSpec(
        id=spec.id,
        entry_point=spec.entry_point,
        kwargs={**spec.kwargs, "layout": layout},
        max_episode_steps=spec.max_episode_steps,
        disable_env_checker=True,
    )


def register_envs() -> None:
    """Register ``flywheel/<task>`` for every Meta-World v3 task (idempotent)."""
    for task in TASK_PROMPTS:
        name = f"{NAMESPACE}/{task}"
        if name not in gym.registry:
            gym.register(
                name, entry_point=ENTRY_POINT, kwargs={"config": {"task": task}}, disable_env_checker=True
            )


class FlatObservation(gym.ObservationWrapper):
    """flywheel observations in Minari's layout: ``{"state": …, <camera>: image, …}``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Dict({"state": space["state"], **space["images"].spaces})

    def observation(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        """Drop the prompt and privileged state; cameras become top-level entries."""
        return {"state": observation["state"], **observation["images"]}
