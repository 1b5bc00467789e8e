"""The Meta-World v3 task table: names, natural-language prompts and default episode lengths.

Prompts are written for the MT50 tasks in the imperative, as a human operator would phrase them. Default
episode lengths come from the clean scripted experts (measured over 10 seeds per task, see docs/envs.md):
200 steps, or 1.5× the slowest expert success rounded up to 50 where that is longer (at most 500).
"""

from __future__ import annotations

import difflib

TASK_PROMPTS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "pick up the cube and move it from one bin to the other",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top, reaching past the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button from the front, reaching past the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial a full rotation",
    "disassemble-v3": "pick the nut up off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock down",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet handle to open it",
    "faucet-close-v3": "turn the faucet handle to close it",
    "hammer-v3": "pick up the hammer and hammer the nail in",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-insert-side-v3": "pick up the peg and insert it into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "push the ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck past the wall to the goal",
    "push-back-v3": "push the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position past the wall",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}

DEFAULT_MAX_EPISODE_STEPS = 200
"""Episode length for tasks not listed in ``TASK_MAX_EPISODE_STEPS`` (experts need 50–100 steps)."""

TASK_MAX_EPISODE_STEPS: dict[str, int] = {
    "bin-picking-v3": 350,
    "disassemble-v3": 300,
    "peg-insert-side-v3": 300,
    "peg-unplug-side-v3": 250,
    "pick-place-wall-v3": 250,
    "push-back-v3": 500,
    "shelf-place-v3": 400,
    "stick-pull-v3": 300,
}
"""Longer episodes where 1.5 × the clean expert's slowest of 10 successes exceeds 200 (rounded up to 50)."""


class UnknownTaskError(ValueError):
    """A task name that is not a Meta-World v3 task; the message lists the closest names."""


def task_names() -> list[str]:
    """All Meta-World v3 task names (MT50), sorted."""
    return sorted(TASK_PROMPTS)


def closest_names(name: str, candidates: list[str], count: int = 5) -> list[str]:
    """The ``count`` candidates most similar to ``name`` (difflib ratio), best first."""
    return difflib.get_close_matches(name, candidates, n=count, cutoff=0.0)


def episode_prompt(prompt: str | None, task: str) -> str:
    """The instruction an episode ran under: its stored prompt; for an episode stored before prompts were (None),
    the Meta-World task's prompt from this table, else the task name."""
    if prompt is not None:
        return prompt
    return TASK_PROMPTS.get(task, task)


def resolve_task(name: str) -> str:
    """Return ``name`` if it is a Meta-World v3 task, else raise ``UnknownTaskError`` naming the closest."""
    if name in TASK_PROMPTS:
        return name
    suggestions = ", ".join(closest_names(name, task_names()))
    raise UnknownTaskError(f"task: unknown Meta-World task {name!r}; closest names: {suggestions}")


def task_prompt(task: str) -> str:
    """The natural-language instruction for a task."""
    return TASK_PROMPTS[resolve_task(task)]


def task_max_episode_steps(task: str) -> int:
    """The default episode length of a task."""
    return TASK_MAX_EPISODE_STEPS.get(resolve_task(task), DEFAULT_MAX_EPISODE_STEPS)
