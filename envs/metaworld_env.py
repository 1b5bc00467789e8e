"""Meta-World v3 tasks as gymnasium envs that return the flywheel ``Observation`` dict.

Observation (see ``core.types.Observation``):

- ``images``: ``{camera: H×W×3 uint8}`` for each configured camera, correct orientation (``corner*`` cameras
  are rotated by 180°, see ``envs.rendering``); empty when ``render=False``.
- ``state``: ``float32``, the ``EnvConfig.state_parts`` of Meta-World's observation concatenated in the order
  given (``STATE_PARTS`` names them). The default ``("hand", "gripper", "goal")`` is 7-D: ``[hand_x, hand_y,
  hand_z, gripper_opening, goal_x, goal_y, goal_z]`` (obs indices 0:3, 3, 36:39; the gripper opening is the
  normalized finger distance in [0, 1]). The goal is included by default because goal sites are a few pixels
  wide at 64–96 px and invisible for ``reach``-style tasks. A task with an object needs it in the state when
  the policy sees no camera (the state tier): e.g. ``("hand", "gripper", "object", "goal")`` (10-D) for
  ``pick-place-v3``; ``PRIVILEGED_PARTS`` is the full 39-D observation. A policy trained on one layout must be
  run on the same layout (a VLA checkpoint refuses another state size with a one-line error).
- ``prompt``: the task's instruction from ``envs.tasks.TASK_PROMPTS`` (or ``EnvConfig.prompt``).
- ``privileged``: Meta-World's raw 39-D observation as ``float32`` (hand, gripper, object poses, the
  previous frame's 18 values, goal) — for scripted experts and simulated humans only.

``info["success"]`` is a bool and ``info["dense_reward"]`` Meta-World's shaped reward (whatever ``reward``
is configured), next to Meta-World's own info keys. ``success_tolerance`` makes a harder-tolerance variant of
a task in ``TOLERANCE_PAIRS``: success is then ``‖a − b‖ ≤ tolerance`` for the task's pair of privileged-state
positions (e.g. hand and goal for ``reach-v3``; Meta-World's own test is 5 cm), the distance is in
``info["tolerance_distance"]`` and Meta-World's verdict in ``info["metaworld_success"]``. By default an
episode terminates on success (``terminate_on_success``) and is truncated after ``max_episode_steps``
(per-task default from ``envs.tasks``).

Seeding: ``reset(seed=s)`` reseeds the task's object/goal sampler, so the same seed gives the same initial
scene; ``reset()`` without a seed continues the stream (the first reset uses ``EnvConfig.seed``).
"""

from __future__ import annotations

import os
import string
from typing import Any, Literal

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.types import Observation
from envs.rendering import CameraRenderer
from envs.tasks import resolve_task, task_max_episode_steps, task_prompt

HAND = slice(0, 3)
GRIPPER = slice(3, 4)
OBJECT = slice(4, 7)
GOAL = slice(36, 39)
PRIVILEGED_DIM = 39
ACTION_DIM = 4
STATE_PARTS: dict[str, slice] = {
    "hand": HAND,
    "gripper": GRIPPER,
    "object": OBJECT,
    "object_quat": slice(7, 11),
    "object2": slice(11, 14),
    "object2_quat": slice(14, 18),
    "previous": slice(18, 36),
    "goal": GOAL,
}
"""Named slices of Meta-World's 39-D observation that ``EnvConfig.state_parts`` picks the ``state`` from
(``previous`` is the previous frame's hand, gripper and object values)."""
DEFAULT_STATE_PARTS = ("hand", "gripper", "goal")
PRIVILEGED_PARTS = tuple(STATE_PARTS)
"""Every part in the observation's own order: the full 39-D observation as ``state``."""


def state_dim(parts: tuple[str, ...]) -> int:
    """The size of a ``state`` made of ``parts`` (names in ``STATE_PARTS``)."""
    return sum(STATE_PARTS[part].stop - STATE_PARTS[part].start for part in parts)


STATE_DIMS = frozenset(
    state_dim(parts)
    for parts in (
        DEFAULT_STATE_PARTS,
        ("hand", "gripper"),
        ("hand", "gripper", "object", "goal"),
        PRIVILEGED_PARTS,
    )
)
"""The state sizes of the common layouts (7 default, 4 without the goal, 10 with the object, 39 full): what an
ingest endpoint accepts for a Meta-World task."""
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
"""The cameras of every Meta-World v3 scene (the sawyer base model)."""
PROMPT_SPACE = gym.spaces.Text(max_length=512, charset=string.printable)
#: Tasks whose success is a distance between two privileged-state positions (Meta-World tests it at 5 cm):
#: the positions a ``success_tolerance`` variant measures.
TOLERANCE_PAIRS: dict[str, tuple[slice, slice]] = {
    "reach-v3": (HAND, GOAL),
    "push-v3": (OBJECT, GOAL),
    "pick-place-v3": (OBJECT, GOAL),
}
HANDOFF_PAIRS: dict[str, tuple[slice, slice]] = {
    "hand-object": (HAND, OBJECT),
    "object-goal": (OBJECT, GOAL),
    "hand-goal": (HAND, GOAL),
    "hand-object-xy": (slice(0, 2), slice(4, 6)),
}
"""Named pairs of privileged-state positions whose distance marks a task's precision-critical phase: what
``rlt.phase.handoff_switch`` hands off to RLT on (``--handoff``, a pipeline's ``rlt.handoff``). ``hand-object-xy``
is the hand's horizontal distance to the object: small once the hand is above it, before the grasp descent."""
HANDOFF_INFO_KEYS = ("grasp_success", "near_object")
"""Meta-World's per-step 0/1 phase flags in the env info (after the first step; ``reset``'s info has none): what
an ``info:<key>`` hand-off reads (``rlt.phase.InfoKeySwitch``; ``--handoff info:grasp_success``)."""
PRECISION_HANDOFFS: dict[str, tuple[str, float]] = {
    "pick-place-v3": ("hand-object-xy", 0.04),
    "peg-insert-side-v3": ("hand-object-xy", 0.05),
    "assembly-v3": ("hand-object-xy", 0.05),
}
"""A ``HANDOFF_PAIRS`` pair and distance (m) that hand a task over at the start of its grasp approach: the hand
above the object, where Meta-World's scripted expert starts its descent (its own test: xy within 2 cm of its
target for pick-place and assembly, 4 cm for peg-insert-side). A prior whose grasp target is biased by 1–1.5 cm
still gets there (``benchmarks/results/biased_priors.txt`` counts the firings)."""


def goal_distance(task: str, privileged: np.ndarray) -> float:
    """How far ``task`` is from done in metres: its ``TOLERANCE_PAIRS`` distance (reach: hand to goal), else the
    first object's distance to the goal, on one 39-D privileged state."""
    first, second = TOLERANCE_PAIRS.get(resolve_task(task), (OBJECT, GOAL))
    state = np.asarray(privileged, dtype=np.float32)
    return float(np.linalg.norm(state[first] - state[second]))


class EnvConfig(BaseModel):
    """Configuration of one Meta-World env (validated; unknown fields are rejected)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str = "pick-place-v3"
    cameras: tuple[str, ...] = Field(default=("corner2",), min_length=1, max_length=4)
    width: int = Field(default=96, ge=16, le=1024)
    height: int = Field(default=96, ge=16, le=1024)
    render: bool = True
    max_episode_steps: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)
    state_parts: tuple[str, ...] = Field(default=DEFAULT_STATE_PARTS, min_length=1)
    terminate_on_success: bool = True
    reward: Literal["dense", "sparse"] = "dense"
    prompt: str | None = None
    success_tolerance: float | None = Field(default=None, gt=0.0)

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        return resolve_task(task)

    @field_validator("cameras")
    @classmethod
    def _known_unique_cameras(cls, cameras: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [camera for camera in cameras if camera not in CAMERAS]
        if unknown:
            raise ValueError(f"cameras: unknown camera {unknown[0]!r}; expected one of {', '.join(CAMERAS)}")
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"cameras: expected distinct camera names, got {list(cameras)}")
        return cameras

    @field_validator("state_parts")
    @classmethod
    def _known_unique_parts(cls, parts: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [part for part in parts if part not in STATE_PARTS]
        if unknown:
            raise ValueError(
                f"state_parts: unknown part {unknown[0]!r}; expected some of {', '.join(STATE_PARTS)}"
            )
        if len(set(parts)) != len(parts):
            raise ValueError(f"state_parts: expected distinct parts, got {list(parts)}")
        return parts

    @property
    def state_dim(self) -> int:
        """The size of ``state``: the summed sizes of ``state_parts``."""
        return state_dim(self.state_parts)

    @model_validator(mode="after")
    def _tolerance_task(self) -> EnvConfig:
        if self.success_tolerance is not None and self.task not in TOLERANCE_PAIRS:
            raise ValueError(f"success_tolerance: supported for {sorted(TOLERANCE_PAIRS)}, not {self.task!r}")
        return self

    @property
    def episode_steps(self) -> int:
        """The effective episode length (the task default when ``max_episode_steps`` is unset)."""
        return self.max_episode_steps or task_max_episode_steps(self.task)

    @property
    def instruction(self) -> str:
        """The effective prompt (the task's default instruction unless overridden)."""
        return self.prompt or task_prompt(self.task)


class MetaWorldEnv(gym.Env):
    """One Meta-World v3 task with flywheel observations, configured by an ``EnvConfig``."""

    metadata = {"render_modes": ["rgb_array"]}  # noqa: RUF012 (gymnasium's class attribute)
    robot_type = "sawyer"

    def __init__(self, config: EnvConfig | None = None) -> None:
        self.config = config or EnvConfig()
        self.task = self.config.task
        self.prompt = self.config.instruction
        self.max_episode_steps = self.config.episode_steps
        self.render_mode = "rgb_array"
        self._sim = _make_sim(self.task, self.max_episode_steps)
        self._renderer = (
            CameraRenderer(
                self._sim.model,
                self._sim.data,
                list(self.config.cameras),
                self.config.width,
                self.config.height,
            )
            if self.config.render
            else None
        )
        self._seeded = False
        self._steps = 0
        self._last_images: dict[str, np.ndarray] = {}
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self.observation_space = self._observation_space()

    @property
    def unwrapped_sim(self) -> Any:
        """The underlying Meta-World ``SawyerXYZEnv`` (MuJoCo model at ``.model``, data at ``.data``)."""
        return self._sim

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        """Start an episode; ``seed`` fixes the initial object and goal positions."""
        super().reset(seed=seed)
        if seed is None and not self._seeded:
            seed = self.config.seed
        if seed is not None:
            self._sim.seed(seed)
            self._seeded = True
        raw, _ = self._sim.reset()
        self._steps = 0
        return self._observation(raw), {"success": False}

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Apply a 4-D action (xyz hand displacement, gripper effort), clipped to [-1, 1]."""
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(-1), -1.0, 1.0)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action: expected shape ({ACTION_DIM},), got {action.shape}")
        if self._steps >= self.max_episode_steps:
            raise RuntimeError("step() called after the episode was truncated; call reset() first")
        raw, dense_reward, _, _, sim_info = self._sim.step(action)
        self._steps += 1
        info = {**sim_info, "success": bool(sim_info["success"]), "dense_reward": float(dense_reward)}
        if self.config.success_tolerance is not None:
            distance = self._tolerance_distance(raw)
            info |= {
                "metaworld_success": info["success"],
                "tolerance_distance": distance,
                "success": distance <= self.config.success_tolerance,
            }
        success = info["success"]
        reward = float(success) if self.config.reward == "sparse" else float(dense_reward)
        terminated = success and self.config.terminate_on_success
        truncated = self._steps >= self.max_episode_steps and not terminated
        return self._observation(raw), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """The first camera's latest image (``None`` in image-free mode)."""
        if not self._last_images:
            return None
        return self._last_images[self.config.cameras[0]]

    def close(self) -> None:
        """Free the renderer and the simulator."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._sim.close()

    def _tolerance_distance(self, raw: np.ndarray) -> float:
        first, second = TOLERANCE_PAIRS[self.task]
        return float(np.linalg.norm(raw[first] - raw[second]))

    def _observation(self, raw: np.ndarray) -> Observation:
        privileged = raw.astype(np.float32)
        parts = [privileged[STATE_PARTS[part]] for part in self.config.state_parts]
        self._last_images = self._renderer.render(self._sim.data) if self._renderer is not None else {}
        return Observation(
            images=self._last_images,
            state=np.concatenate(parts),
            prompt=self.prompt,
            privileged=privileged,
        )

    def _observation_space(self) -> gym.spaces.Dict:
        shape = (self.config.height, self.config.width, 3)
        cameras = self.config.cameras if self.config.render else ()
        return gym.spaces.Dict(
            {
                "images": gym.spaces.Dict(
                    {camera: gym.spaces.Box(0, 255, shape=shape, dtype=np.uint8) for camera in cameras}
                ),
                "state": gym.spaces.Box(-np.inf, np.inf, shape=(self.config.state_dim,), dtype=np.float32),
                "prompt": PROMPT_SPACE,
                "privileged": gym.spaces.Box(-np.inf, np.inf, shape=(PRIVILEGED_DIM,), dtype=np.float32),
            }
        )


def _make_sim(task: str, max_episode_steps: int) -> Any:
    """A Meta-World env with the goal in its observation and a fresh, seedable scene at every reset."""
    sim = ALL_V3_ENVIRONMENTS[task]()
    sim._partially_observable = False
    del sim.sawyer_observation_space  # cached property: recompute with the goal observable
    sim._freeze_rand_vec = False
    sim.seeded_rand_vec = True
    sim._set_task_called = True
    sim.max_path_length = max_episode_steps
    return sim
