"""One entry point to build a flywheel env from its config, optionally with a simulated human watching."""

from __future__ import annotations

import gymnasium as gym

from envs.gym_adapter import GymAdapterEnv, GymEnvConfig
from envs.injection import BadSegmentWrapper, InjectionConfig
from envs.interventions import InterventionWrapper, SimulatedHuman, SimulatedHumanConfig
from envs.metaworld_env import EnvConfig, MetaWorldEnv
from envs.registration import env_spec


def make_env(
    config: EnvConfig | GymEnvConfig,
    human: SimulatedHumanConfig | None = None,
    inject: InjectionConfig | None = None,
) -> gym.Env:
    """A Meta-World env (``EnvConfig``) or any gymnasium env (``GymEnvConfig``) with flywheel observations.

    With ``human`` the env is wrapped in an ``InterventionWrapper`` whose ``SimulatedHuman`` is the task's
    scripted expert (Meta-World tasks only: generic envs have no expert). With ``inject`` a
    ``BadSegmentWrapper`` goes around that (the human sees the injected actions as the robot's). The env's
    ``unwrapped.spec`` is its ``envs.registration.env_spec``.
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
    env.unwrapped.spec = env_spec(config)  # gymnasium.make(spec) rebuilds it (envs.registration)
    return env if inject is None else BadSegmentWrapper(env, inject)
