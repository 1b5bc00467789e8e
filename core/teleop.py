"""The teleoperation contract: what a device sees before a step and what it answers.

The robot runtime (``actors.robot_runtime``) and the simulation's ``envs.interventions.InterventionWrapper`` poll
a ``TeleopDevice`` every step; ``envs.interventions.SimulatedHuman`` is one, a keyboard, gamepad or spacemouse
driver is another. Here in ``core`` so both sides use it without importing each other (or mujoco).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from core.types import InterventionSegment, Observation


@dataclass(frozen=True)
class TeleopContext:
    """What a teleoperation device may look at before a step: the current observation, the policy's proposed
    action, the step index and the previous step's reward and info (0 and ``{}`` at the first step)."""

    observation: Observation
    policy_action: np.ndarray
    t: int
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TeleopCommand:
    """A device's answer: ``takeover=True`` runs ``action`` instead of the policy's; ``reason`` says why.

    ``subtask`` optionally names the subtask the human is executing (a correction of the high-level policy).
    """

    takeover: bool
    action: np.ndarray | None = None
    reason: str = "teleop"
    subtask: str | None = None


@runtime_checkable
class TeleopDevice(Protocol):
    """Anything that can take over from the policy: a simulated human, a keyboard, a gamepad, a spacemouse."""

    def reset(self, seed: int | None = None) -> None:
        """Called at the start of every episode."""
        ...

    def poll(self, context: TeleopContext) -> TeleopCommand | None:
        """The device's command for this step; ``None`` (or ``takeover=False``) lets the policy act."""
        ...


@dataclass
class TakeoverSegments:
    """An episode's takeover segments, built step by step: ``start`` when a human takes over, ``stop`` when the
    policy is back (or the episode ends). The one builder for the simulation's wrapper and the robot runtime."""

    closed: list[InterventionSegment] = field(default_factory=list)
    open_since: tuple[int, str] | None = None

    def start(self, t: int, reason: str) -> None:
        """A takeover at step ``t`` (a no-op while one is open)."""
        if self.open_since is None:
            self.open_since = (t, reason)

    def stop(self, t: int) -> None:
        """Close the open takeover (if any) before step ``t``."""
        if self.open_since is not None:
            self.closed.append(InterventionSegment(self.open_since[0], t, self.open_since[1]))
            self.open_since = None

    def until(self, t: int) -> list[InterventionSegment]:
        """The segments so far, an open one reported up to step ``t``."""
        if self.open_since is None:
            return list(self.closed)
        return [*self.closed, InterventionSegment(self.open_since[0], t, self.open_since[1])]
