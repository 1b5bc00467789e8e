"""Critical-phase hand-off: the VLA acts until a ``PhaseSwitch`` fires, RLT after (latched per episode)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from policies.base import Observation
from rlt.errors import RLTInputError


@runtime_checkable
class PhaseSwitch(Protocol):
    """Decides, at a chunk boundary, whether the episode has entered its precision-critical phase."""

    def reset(self) -> None:
        """Called at the start of every episode."""
        ...

    def is_critical(self, observation: Observation, info: dict[str, Any]) -> bool:
        """True once the critical phase has begun (the online loop latches the first True)."""
        ...


class InfoKeySwitch:
    """Critical when ``info[key]`` is truthy (an env that knows its own phases)."""

    def __init__(self, key: str = "critical_phase") -> None:
        self.key = key

    def reset(self) -> None:
        """Nothing to reset."""

    def is_critical(self, observation: Observation, info: dict[str, Any]) -> bool:
        return bool(info.get(self.key, False))


class DistanceSwitch:
    """Critical when ``‖privileged[first] − privileged[second]‖ < threshold`` (e.g. hand to object)."""

    def __init__(self, first: Sequence[int], second: Sequence[int], threshold: float) -> None:
        if len(first) != len(second) or not first:
            raise RLTInputError(
                f"DistanceSwitch: first and second must be equal-length index lists, got {first} / {second}"
            )
        self.first, self.second, self.threshold = list(first), list(second), threshold

    def reset(self) -> None:
        """Nothing to reset."""

    def is_critical(self, observation: Observation, info: dict[str, Any]) -> bool:
        if "privileged" not in observation:
            raise RLTInputError("observation.privileged: DistanceSwitch needs the privileged simulator state")
        state = np.asarray(observation["privileged"])
        return bool(np.linalg.norm(state[self.first] - state[self.second]) < self.threshold)


class OperatorSwitch:
    """Critical while an operator has engaged it (``engage`` / ``release``); cleared at every reset."""

    def __init__(self) -> None:
        self.engaged = False

    def engage(self) -> None:
        """Hand control to RLT from the next chunk on."""
        self.engaged = True

    def release(self) -> None:
        """Withdraw the hand-off request (has no effect once an episode has latched)."""
        self.engaged = False

    def reset(self) -> None:
        self.engaged = False

    def is_critical(self, observation: Observation, info: dict[str, Any]) -> bool:
        return self.engaged


class AlwaysCritical:
    """RLT acts from the first chunk (no hand-off)."""

    def reset(self) -> None:
        """Nothing to reset."""

    def is_critical(self, observation: Observation, info: dict[str, Any]) -> bool:
        return True


METAWORLD_PAIRS: dict[str, tuple[list[int], list[int]]] = {
    "hand-object": ([0, 1, 2], [4, 5, 6]),
    "object-goal": ([4, 5, 6], [36, 37, 38]),
    "hand-goal": ([0, 1, 2], [36, 37, 38]),
}
"""Index groups of Meta-World's 39-D privileged state (hand xyz, first object xyz, goal xyz)."""


def metaworld_switch(pair: str, distance: float) -> PhaseSwitch:
    """``DistanceSwitch`` on a ``METAWORLD_PAIRS`` pair; ``distance ≤ 0`` means RLT acts from the start."""
    if pair not in METAWORLD_PAIRS:
        raise RLTInputError(f"hand-off pair: expected one of {sorted(METAWORLD_PAIRS)}, got {pair!r}")
    if distance <= 0:
        return AlwaysCritical()
    return DistanceSwitch(*METAWORLD_PAIRS[pair], distance)
