"""Scripted experts: Meta-World's hand-written policies, reading the privileged 39-D observation.

``ScriptedExpert.act`` returns the expert's action plus Gaussian noise of std ``noise_std`` (the quality
knob: 0 is the clean expert, 0.3–1.0 gives mediocre demonstrations), clipped to [-1, 1], from a seeded
generator.

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

# Meta-World's policies warn on every call whose proportional response exceeds 1 (the env clips it anyway).
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)


class ScriptedExpert:
    """The Meta-World scripted policy for ``task`` with seeded Gaussian action noise."""

    def __init__(self, task: str, noise_std: float = 0.0, seed: int | None = 0) -> None:
        if noise_std < 0:
            raise ValueError(f"noise_std: expected a value >= 0, got {noise_std}")
        self.task = resolve_task(task)
        self.noise_std = float(noise_std)
        self._policy = ENV_POLICY_MAP[self.task]()
        self._rng = np.random.default_rng(seed)
        self._branch = _branch_function(type(self._policy))

    def reseed(self, seed: int | None) -> None:
        """Restart the noise generator."""
        self._rng = np.random.default_rng(seed)

    def clean_action(self, privileged: np.ndarray) -> np.ndarray:
        """The noise-free expert action for one 39-D observation, clipped to [-1, 1], ``float32``."""
        action = self._policy.get_action(np.asarray(privileged, dtype=np.float64))
        return np.clip(action, -1.0, 1.0).astype(np.float32)

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
        parsed = self._policy._parse_obs(np.asarray(privileged, dtype=np.float64))
        return f"phase{self._branch(parsed)}"


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
