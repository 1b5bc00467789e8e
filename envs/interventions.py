"""Human interventions: a wrapper in which a teleoperation device can take over from the acting policy.

``InterventionWrapper.step(policy_action)`` first polls its ``TeleopDevice``. If the device asks to take
over, the device's action is executed and the step is marked ``StepSource.HUMAN``; otherwise the policy's action
is executed (``StepSource.POLICY``). Every step's ``info`` carries:

- ``source``: ``int`` (0 policy, 1 human — the same values as ``storage.records.StepSource``),
- ``executed_action``: the action actually applied (clipped to the action space), ``policy_action``: what
  the policy proposed, ``intervention_trigger``: the reason of the current takeover (``None`` on policy
  steps), ``subtask``: the subtask the human says the robot is on (a corrected high-level label; ``None`` on
  policy steps and from devices that do not name one),
- ``interventions``: the episode's takeover segments so far (contiguous human steps form one segment, named
  by the trigger that started it), as dicts ``{"t_start", "t_end", "trigger"}``
  with ``t_end`` exclusive (an open segment is reported up to the current step), complete on the episode's
  last step.

``SimulatedHuman`` is the device used in simulation: the scripted expert watches the policy and takes over
when a trigger fires — no progress for K steps (progress is the env's dense reward,
``info["dense_reward"]``, falling back to the step reward), the policy's action deviating from the clean
expert action by more than a threshold (L2 over the 4 action dimensions) for some consecutive steps, or at
random with a per-step rate — then acts for ``takeover_steps`` steps (with its own action noise) and hands
back. A phase gate makes it a *late* corrector: with ``late_distance`` its triggers are only watched while the
task's goal distance (``envs.metaworld_env.goal_distance``: the object's, or for reach the hand's, distance to
the goal) is at most that, and with ``late_after_step`` only from that step on; outside the gate the triggers'
counters restart, so e.g. ``no_progress`` fires only after the robot stalled *near the goal* for K steps.
Corrected episodes then keep their sloppy early autonomous stretches, and failed ones their good early phases.
With ``release_grip`` the human opens the gripper (grab effort −1) wherever the expert applies no grip (0):
Meta-World's pick experts (pick-place, push) never open a gripper, they assume it starts open, so without it the
human cannot regrasp an object beside which the policy closed the gripper — the usual late failure of a
pick-place policy. While acting it also names the subtask it is executing (the scripted expert's phase), so rollouts of a
hierarchical policy store a human-corrected subtask for every intervention step. A real keyboard, gamepad or spacemouse is another ``TeleopDevice``: it returns its own command from
``poll`` and ignores the context."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import gymnasium as gym
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.teleop import TakeoverSegments, TeleopCommand, TeleopContext, TeleopDevice
from core.types import InterventionSegment, Observation, StepSource
from envs.experts import ScriptedExpert
from envs.metaworld_env import goal_distance


class SimulatedHumanConfig(BaseModel):
    """Triggers and behaviour of the simulated human (validated; a trigger set to ``None``/0 is off)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    no_progress_steps: int | None = Field(default=30, ge=1)
    progress_tolerance: float = Field(default=0.1, ge=0.0)
    deviation_threshold: float | None = Field(default=None, gt=0.0)
    deviation_steps: int = Field(default=1, ge=1)
    random_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    takeover_steps: int = Field(default=20, ge=1)
    noise_std: float = Field(default=0.0, ge=0.0)
    seed: int = Field(default=0, ge=0)
    late_distance: float | None = Field(default=None, gt=0.0)
    late_after_step: int | None = Field(default=None, ge=0)
    release_grip: bool = False


class SimulatedHuman:
    """The scripted expert as a ``TeleopDevice`` that takes over when one of its triggers fires."""

    def __init__(self, task: str, config: SimulatedHumanConfig | None = None) -> None:
        self.config = config or SimulatedHumanConfig()
        self.expert = ScriptedExpert(task, noise_std=self.config.noise_std, seed=self.config.seed)
        self._rng = np.random.default_rng(self.config.seed)
        self._episodes = 0
        self._remaining = 0
        self._reason = ""
        self._watch_from_scratch()

    def reset(self, seed: int | None = None) -> None:
        """Forget the previous episode; ``seed`` (if given) reseeds the triggers and the action noise."""
        if seed is not None:
            self._rng = np.random.default_rng([self.config.seed, seed])
            self.expert.reseed(int(self._rng.integers(2**31)))
        self._remaining = 0
        self._watch_from_scratch()

    def poll(self, context: TeleopContext) -> TeleopCommand | None:
        """Keep acting during a takeover; otherwise check the triggers against the policy's behaviour."""
        privileged = context.observation["privileged"]
        if self._remaining > 0:
            return self._act(privileged)
        if not self._gate_open(context):
            self._watch_from_scratch()
            return None
        reason = self._trigger(context)
        if reason is None:
            return None
        self._remaining = self.config.takeover_steps
        self._reason = reason
        return self._act(privileged)

    def _act(self, privileged: np.ndarray) -> TeleopCommand:
        self._remaining -= 1
        if self._remaining == 0:
            self._watch_from_scratch()  # hand back: judge the policy afresh
        action = self.expert.clean_action(privileged)
        if self.config.release_grip and action[3] == 0.0:
            action[3] = -1.0
        return TeleopCommand(
            takeover=True,
            action=self.expert.add_noise(action),
            reason=self._reason,
            subtask=self.expert.phase(privileged),
        )

    def _gate_open(self, context: TeleopContext) -> bool:
        """Whether the phase gate lets the triggers watch this step (always, without a gate)."""
        late_step, late_distance = self.config.late_after_step, self.config.late_distance
        if late_step is not None and context.t < late_step:
            return False
        if late_distance is None:
            return True
        return goal_distance(self.expert.task, context.observation["privileged"]) <= late_distance

    def _watch_from_scratch(self) -> None:
        self._best_progress = -np.inf
        self._stalled_steps = 0
        self._deviating_steps = 0

    def _trigger(self, context: TeleopContext) -> str | None:
        """The name of the first trigger that fires this step, if any (all are evaluated to keep counters)."""
        fired = [
            name
            for name, firing in (
                ("deviation", self._deviation_fires(context)),
                ("no_progress", self._no_progress_fires(context)),
                ("random", self._random_fires()),
            )
            if firing
        ]
        return fired[0] if fired else None

    def _deviation_fires(self, context: TeleopContext) -> bool:
        if self.config.deviation_threshold is None:
            return False
        expert_action = self.expert.clean_action(context.observation["privileged"])
        distance = float(np.linalg.norm(np.asarray(context.policy_action) - expert_action))
        self._deviating_steps = self._deviating_steps + 1 if distance > self.config.deviation_threshold else 0
        return self._deviating_steps >= self.config.deviation_steps

    def _no_progress_fires(self, context: TeleopContext) -> bool:
        if self.config.no_progress_steps is None:
            return False
        progress = float(context.info.get("dense_reward", context.reward))
        if progress > self._best_progress + self.config.progress_tolerance:
            self._best_progress = progress
            self._stalled_steps = 0
        else:
            self._stalled_steps += 1
        return self._stalled_steps >= self.config.no_progress_steps

    def _random_fires(self) -> bool:
        return self.config.random_rate > 0 and bool(self._rng.random() < self.config.random_rate)


class InterventionWrapper(gym.Wrapper):
    """Executes the policy's action or the teleop device's, recording provenance and takeover segments."""

    def __init__(self, env: gym.Env, device: TeleopDevice) -> None:
        super().__init__(env)
        if not isinstance(device, TeleopDevice):
            raise TypeError(f"device: expected a TeleopDevice (reset, poll), got {type(device).__name__}")
        self.device = device
        self._segments = TakeoverSegments()
        self._t = 0
        self._observation: Observation | None = None
        self._reward = 0.0
        self._info: dict[str, Any] = {}

    @property
    def interventions(self) -> list[InterventionSegment]:
        """The current episode's takeover segments (an open one reported up to the current step)."""
        return self._segments.until(self._t)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset the env and the device."""
        observation, info = self.env.reset(seed=seed, options=options)
        self.device.reset(seed)
        self._segments, self._t = TakeoverSegments(), 0
        self._observation, self._reward, self._info = observation, 0.0, {}
        return observation, {**info, "interventions": []}

    def step(self, policy_action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Execute the device's action if it takes over, else ``policy_action``; annotate ``info``."""
        if self._observation is None:
            raise RuntimeError("step() called before reset()")
        policy_action = np.asarray(policy_action, dtype=np.float32)
        context = TeleopContext(self._observation, policy_action, self._t, self._reward, self._info)
        command = self.device.poll(context)
        human = command is not None and command.takeover
        if human:
            if command.action is None:
                raise ValueError("TeleopCommand.action: a takeover command needs an action, got None")
            executed = self._clip(command.action)
            self._segments.start(self._t, command.reason)
        else:
            executed = self._clip(policy_action)
            self._segments.stop(self._t)
        observation, reward, terminated, truncated, info = self.env.step(executed)
        self._t += 1
        if terminated or truncated or info.get("success", False):
            self._segments.stop(self._t)
        self._observation, self._reward, self._info = observation, float(reward), info
        info = {
            **info,
            "source": int(StepSource.HUMAN if human else StepSource.POLICY),
            "executed_action": executed,
            "policy_action": policy_action,
            "intervention_trigger": command.reason if human else None,
            "subtask": command.subtask if human else None,
            "interventions": [asdict(segment) for segment in self.interventions],
        }
        return observation, reward, terminated, truncated, info

    def _clip(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, dtype=np.float32)
        space = self.env.action_space
        if isinstance(space, gym.spaces.Box):
            action = np.clip(action, space.low, space.high).astype(np.float32)
        return action
