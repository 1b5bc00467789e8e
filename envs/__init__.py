"""flywheel envs: Meta-World tasks and any gymnasium env as flywheel-observation envs, scripted experts and
simulated (or real) human interventions. See docs/envs.md."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from envs.experts import ScriptedExpert, expert_phases
from envs.gym_adapter import GymAdapterEnv, GymEnvConfig
from envs.injection import INJECTED_KEY, BadSegmentWrapper, InjectionConfig
from envs.interventions import (
    InterventionWrapper,
    SimulatedHuman,
    SimulatedHumanConfig,
    TeleopCommand,
    TeleopContext,
    TeleopDevice,
)
from envs.metaworld_env import EnvConfig, MetaWorldEnv, goal_distance
from envs.registration import make_env, register_envs
from envs.settings import EnvSettings, is_metaworld_task
from envs.tasks import TASK_PROMPTS, UnknownTaskError, resolve_task, task_max_episode_steps, task_names

register_envs()  # gymnasium.make("flywheel/<task>")

__all__ = [
    "INJECTED_KEY",
    "TASK_PROMPTS",
    "BadSegmentWrapper",
    "EnvConfig",
    "EnvSettings",
    "GymAdapterEnv",
    "GymEnvConfig",
    "InjectionConfig",
    "InterventionWrapper",
    "MetaWorldEnv",
    "ScriptedExpert",
    "SimulatedHuman",
    "SimulatedHumanConfig",
    "TeleopCommand",
    "TeleopContext",
    "TeleopDevice",
    "UnknownTaskError",
    "expert_phases",
    "goal_distance",
    "is_metaworld_task",
    "make_env",
    "resolve_task",
    "task_max_episode_steps",
    "task_names",
]
