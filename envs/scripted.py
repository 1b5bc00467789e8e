"""A ``Policy`` backed by Meta-World's scripted experts (reads ``privileged``, never images).

``infer`` returns ``B×H×D`` chunks. With ``action_horizon=1`` (the default) every action is the expert's exact
closed-loop action. With ``H > 1`` the chunk repeats the expert's action for the current state H times
(zero-order hold, the noise drawn independently per action): the env cannot be rolled forward from inside a
policy, so longer chunks are an open-loop approximation and succeed less often on precise tasks.

The task comes from ``task`` or, when that is ``None``, from each observation's prompt (looked up in
``envs.tasks.TASK_PROMPTS``), so one policy can serve a multi-task batch. ``object_bias`` / ``goal_bias``
make every expert systematically wrong about the object's / goal's position (``envs.experts.ScriptedExpert``).
"""

from __future__ import annotations

import time

import numpy as np

from core.types import ActionChunk, ObservationBatch
from envs.experts import ScriptedExpert
from envs.metaworld_env import PRIVILEGED_DIM
from envs.tasks import TASK_PROMPTS

_TASK_BY_PROMPT = {prompt: task for task, prompt in TASK_PROMPTS.items()}


def scripted_version(
    noise_std: float,
    object_bias: tuple[float, float, float] | None = None,
    goal_bias: tuple[float, float, float] | None = None,
) -> str:
    """The policy version a scripted expert with action noise ``noise_std`` (and a systematic ``object_bias`` /
    ``goal_bias``, see ``envs.experts``) is registered under."""
    version = f"scripted-noise{noise_std:g}"
    for name, bias in (("object", object_bias), ("goal", goal_bias)):
        if bias is not None and any(bias):
            version += f"-{name}-bias" + ",".join(f"{value:g}" for value in bias)
    return version


class ScriptedPolicy:
    """Meta-World scripted experts as a batched chunking policy with a noise knob."""

    action_dim = 4
    privileged_dim = PRIVILEGED_DIM  # what it reads; a server checks requests against it

    def __init__(
        self,
        task: str | None = None,
        *,
        noise_std: float = 0.0,
        seed: int = 0,
        action_horizon: int = 1,
        version: str | None = None,
        object_bias: tuple[float, float, float] | None = None,
        goal_bias: tuple[float, float, float] | None = None,
    ) -> None:
        if action_horizon < 1:
            raise ValueError(f"action_horizon: expected an integer >= 1, got {action_horizon}")
        self.task = task
        self.noise_std = noise_std
        self.action_horizon = action_horizon
        self.biases = {"object_bias": object_bias, "goal_bias": goal_bias}
        self.version = version or scripted_version(noise_std, object_bias, goal_bias)
        self._seeds = np.random.default_rng(seed)
        self._experts: dict[str, ScriptedExpert] = {}
        if task is not None:
            self._expert(task)

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        """One chunk per observation, from ``batch["privileged"]`` (``B×39``)."""
        if "privileged" not in batch:
            raise ValueError("batch: ScriptedPolicy needs 'privileged' (the 39-D Meta-World observation)")
        started = time.perf_counter()
        privileged = np.asarray(batch["privileged"])
        actions = np.empty((len(privileged), self.action_horizon, self.action_dim), dtype=np.float32)
        for row, (obs, prompt) in enumerate(zip(privileged, batch["prompt"], strict=True)):
            expert = self._expert(self.task or self._task_from_prompt(prompt))
            clean = expert.clean_action(obs)
            for step in range(self.action_horizon):
                actions[row, step] = expert.add_noise(clean)
        return ActionChunk(actions=actions, timing={"infer_ms": (time.perf_counter() - started) * 1e3})

    def reset(self) -> None:
        """Scripted experts are stateless between episodes; the noise stream continues."""

    def _expert(self, task: str) -> ScriptedExpert:
        if task not in self._experts:
            seed = int(self._seeds.integers(2**31))
            self._experts[task] = ScriptedExpert(task, self.noise_std, seed=seed, **self.biases)
        return self._experts[task]

    @staticmethod
    def _task_from_prompt(prompt: str) -> str:
        if prompt not in _TASK_BY_PROMPT:
            raise ValueError(
                f"prompt: {prompt!r} is not a Meta-World task prompt; pass task= to ScriptedPolicy"
            )
        return _TASK_BY_PROMPT[prompt]
