"""Critical-phase hand-off: the VLA acts until a ``PhaseSwitch`` fires, RLT after (latched per episode).

A switch is asked at each chunk start with the observation there and ``info``: the entries named by its
``info_keys`` of the env info that came with that observation (from ``reset`` at the episode's first chunk, else
from the step that produced it). ``actors.rollout.RolloutWorker`` passes them to a per-env policy
(``RLTActor``); a switch with no ``info_keys`` sees ``{}``. Records keep no env info: a learner rebuilding the
phase of a record without ``metadata["critical_phase"]`` asks the switch with ``{}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from policies.base import Observation
from rlt.errors import RLTInputError

#: Positions in a state vector: a slice (``slice(0, 3)``) or a list of indices.
Indices = slice | Sequence[int]


@runtime_checkable
class PhaseSwitch(Protocol):
    """Decides, at a chunk boundary, whether the episode has entered its precision-critical phase.

    ``info_keys`` names the env info entries ``is_critical`` reads (empty: the observation alone)."""

    info_keys: tuple[str, ...]

    def reset(self) -> None:
        """Called at the start of every episode."""
        ...

    def is_critical(self, observation: Observation, info: dict[str, Any]) -> bool:
        """True once the critical phase has begun (the online loop latches the first True)."""
        ...


class InfoKeySwitch:
    """Critical when ``info[key]`` is truthy (an env that knows its own phases, e.g. Meta-World's
    ``grasp_success``); a missing entry (e.g. at reset) is not."""

    def __init__(self, key: str = "critical_phase") -> None:
        self.key = key
        self.info_keys = (key,)

    def reset(self) -> None:
        """Nothing to reset."""

    def is_critical(self, observation: Observation, info: dict[str, Any]) -> bool:
        return bool(info.get(self.key, False))


class DistanceSwitch:
    """Critical when ``‖privileged[first] − privileged[second]‖ < threshold`` (e.g. hand to object)."""

    info_keys: tuple[str, ...] = ()

    def __init__(self, first: Indices, second: Indices, threshold: float) -> None:
        self.first, self.second, self.threshold = _index_list(first), _index_list(second), threshold
        if len(self.first) != len(self.second) or not self.first:
            raise RLTInputError(
                f"DistanceSwitch: first and second must be equal-length index groups, got {first} / {second}"
            )

    def reset(self) -> None:
        """Nothing to reset."""

    def is_critical(self, observation: Observation, info: dict[str, Any]) -> bool:
        if "privileged" not in observation:
            raise RLTInputError("observation.privileged: DistanceSwitch needs the privileged simulator state")
        state = np.asarray(observation["privileged"])
        return bool(np.linalg.norm(state[self.first] - state[self.second]) < self.threshold)


class OperatorSwitch:
    """Critical while an operator has engaged it (``engage`` / ``release``); cleared at every reset."""

    info_keys: tuple[str, ...] = ()

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

    info_keys: tuple[str, ...] = ()

    def reset(self) -> None:
        """Nothing to reset."""

    def is_critical(self, observation: Observation, info: dict[str, Any]) -> bool:
        return True


def handoff_switch(pairs: Mapping[str, tuple[Indices, Indices]], pair: str, distance: float) -> PhaseSwitch:
    """``DistanceSwitch`` on ``pairs[pair]``, named positions of the env's privileged state (the caller passes
    its env's layout, e.g. ``envs.metaworld_env.HANDOFF_PAIRS``); ``distance ≤ 0`` means RLT acts from the start."""
    if pair not in pairs:
        raise RLTInputError(f"hand-off pair: expected one of {sorted(pairs)}, got {pair!r}")
    if distance <= 0:
        return AlwaysCritical()
    return DistanceSwitch(*pairs[pair], distance)


def _index_list(indices: Indices) -> list[int]:
    """``indices`` as a list (a slice needs its ``stop``)."""
    if isinstance(indices, slice):
        return list(range(indices.start or 0, indices.stop, indices.step or 1))
    return list(indices)
