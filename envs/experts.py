"""Scripted experts: Meta-World's hand-written policies, reading the privileged 39-D observation.

``ScriptedExpert.act`` returns the expert's action plus Gaussian noise of std ``noise_std`` (the quality
knob: 0 is the clean expert, 0.3–1.0 gives mediocre demonstrations), clipped to [-1, 1], from a seeded
generator.

``object_bias`` and ``goal_bias`` give an expert a systematic error: a fixed offset (metres, xyz) added to the
first object's position (``privileged[4:7]``, and the previous frame's copy) or to the goal (``privileged[36:39]``)
before the expert reads it, like a miscalibrated camera. Every target the expert derives from that position (the
grasp point above the puck; the hole a grasped peg is aligned with) is off by the same amount in every step and
episode: a consistent error, which averaging noisy demonstrations does not remove. The offset is added in
``float32``, the observation's own precision.

``ScriptedExpert.phase`` names the expert's current sub-goal cheaply: most Meta-World policies choose the
hand's target in a ``_desired_pos`` function made of ``if``/``elif`` branches, each ending in a ``return``.
A copy of that function is compiled with every ``return x`` rewritten to ``return (k, x)``, so the phase is
``"phase<k>"``, k being the index of the branch taken in source order (not necessarily temporal order), and
``"phase0"`` for the few policies without such a function (reach, drawer-open)."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from envs.tasks import resolve_task

#: The first object's position in the 39-D observation and the previous frame's copy of it (the scripted
#: experts read the first; ``envs.metaworld_env.STATE_PARTS`` names both), and the goal's.
_OBJECT_POSITIONS = (slice(4, 7), slice(22, 25))
_GOAL_POSITION = slice(36, 39)

# Meta-World's policies warn on every call whose proportional response exceeds 1 (the env clips it anyway).
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)


class ScriptedExpert:
    """The Meta-World scripted policy for ``task`` with seeded Gaussian action noise."""

    def __init__(
        self,
        task: str,
        noise_std: float = 0.0,
        seed: int | None = 0,
        object_bias: tuple[float, float, float] | None = None,
        goal_bias: tuple[float, float, float] | None = None,
    ) -> None:
        if noise_std < 0:
            raise ValueError(f"noise_std: expected a value >= 0, got {noise_std}")
        self.task = resolve_task(task)
        self.noise_std = float(noise_std)
        self.object_bias = _offset("object_bias", object_bias)
        self.goal_bias = _offset("goal_bias", goal_bias)
        self._policy = ENV_POLICY_MAP[self.task]()
        self._rng = np.random.default_rng(seed)
        self._branch = _branch_function(type(self._policy))

    def reseed(self, seed: int | None) -> None:
        """Restart the noise generator."""
        self._rng = np.random.default_rng(seed)

    def clean_action(self, privileged: np.ndarray) -> np.ndarray:
        """The noise-free expert action for one 39-D observation (as the expert perceives it, with its
        ``object_bias`` / ``goal_bias``), clipped to [-1, 1], ``float32``."""
        action = self._policy.get_action(self.perceived(privileged))
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def perceived(self, privileged: np.ndarray) -> np.ndarray:
        """The 39-D observation as the expert reads it (``float64``): the object moved by ``object_bias``, the
        goal by ``goal_bias``."""
        observation = np.array(privileged, dtype=np.float32)
        for positions in _OBJECT_POSITIONS:
            observation[positions] += self.object_bias
        observation[_GOAL_POSITION] += self.goal_bias
        return observation.astype(np.float64)

    def act(self, privileged: np.ndarray) -> np.ndarray:
        """The expert action with the configured noise (clipped to [-1, 1], ``float32``)."""
        return self.add_noise(self.clean_action(privileged))

    def add_noise(self, action: np.ndarray) -> np.ndarray:
        """``action`` plus Gaussian noise of std ``noise_std``, clipped to [-1, 1], ``float32``."""
        if self.noise_std > 0:
            action = action + self._rng.normal(0.0, self.noise_std, size=action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def phase(self, privileged: np.ndarray) -> str:
        """The expert's current sub-goal label (``"phase<k>"``, see the module docstring)."""
        if self._branch is None:
            return "phase0"
        parsed = self._policy._parse_obs(self.perceived(privileged))
        return f"phase{self._branch(parsed)}"


#: Where each task's scripted prior is systematically wrong: ``"<position>:<axis>"``, the position the expert
#: misjudges (``object``: what it grasps; ``goal``: what it aligns with or reaches) and the direction. The
#: grasping tasks' entries are the direction of ±x, ±y, +z that costs a noisy prior (σ 0.3, chunks of 10) most at
#: 1.5 cm (``benchmarks/results/biased_priors.txt``); reach reads only the goal. Other tasks: ``object:+x``.
PRIOR_BIASES: dict[str, str] = {
    "pick-place-v3": "object:+y",
    "peg-insert-side-v3": "object:+y",
    "assembly-v3": "object:+y",
    "reach-v3": "goal:+x",
}
_AXES = {"x": 0, "y": 1, "z": 2}


def prior_bias_direction(task: str) -> str:
    """Where ``task``'s scripted prior is biased (its ``PRIOR_BIASES`` entry, else ``object:+x``)."""
    return PRIOR_BIASES.get(resolve_task(task), "object:+x")


def bias_vectors(spec: str, metres: float) -> dict[str, tuple[float, float, float]]:
    """``ScriptedExpert`` bias arguments for ``metres`` along ``spec`` (``"object:+x"``, ``"goal:-y"``, …)."""
    position, _, direction = spec.partition(":")
    if position not in ("object", "goal") or direction.lstrip("+-") not in _AXES:
        raise ValueError(f"prior bias: expected '<object|goal>:<±x|y|z>', got {spec!r}")
    vector = [0.0, 0.0, 0.0]
    vector[_AXES[direction.lstrip("+-")]] = -metres if direction.startswith("-") else metres
    return {f"{position}_bias": (vector[0], vector[1], vector[2])}


def _offset(name: str, offset: tuple[float, float, float] | None) -> np.ndarray:
    """A bias argument as a ``float32`` xyz vector (zeros for None)."""
    vector = np.zeros(3, np.float32) if offset is None else np.asarray(offset, dtype=np.float32)
    if vector.shape != (3,):
        raise ValueError(f"{name}: expected 3 values (x, y, z in metres), got {offset}")
    return vector


def expert_phases(task: str, privileged: np.ndarray) -> list[str]:
    """Phase labels for a stored episode's ``T×39`` privileged states (offline subtask relabelling)."""
    expert = ScriptedExpert(task)
    return [expert.phase(row) for row in np.asarray(privileged)]


@functools.cache
def _branch_function(policy_class: type) -> Callable[[dict[str, Any]], int] | None:
    """A copy of ``policy_class._desired_pos`` that returns the index of the ``return`` it reached."""
    function = policy_class.__dict__.get("_desired_pos")
    if function is None:
        return None
    target = function.__func__ if isinstance(function, staticmethod) else function
    tree = ast.parse(textwrap.dedent(inspect.getsource(target)))
    definition = tree.body[0]
    definition.decorator_list = []
    returns = [node for node in ast.walk(definition) if isinstance(node, ast.Return)]
    for index, node in enumerate(returns):
        node.value = ast.Constant(index)
    namespace = dict(inspect.getmodule(target).__dict__)
    exec(compile(ast.fix_missing_locations(tree), inspect.getsourcefile(target), "exec"), namespace)
    return namespace[definition.name]
