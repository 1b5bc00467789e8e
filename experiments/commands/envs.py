"""``flywheel envs``: list the Meta-World tasks, render a task's cameras, measure its scripted expert."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from envs import MetaWorldEnv, ScriptedExpert

app = typer.Typer(no_args_is_help=True, help="Meta-World tasks: list, render, expert check.")
console = Console()


@app.command(name="list")
def list_tasks() -> None:
    """Every Meta-World v3 task with its prompt and default episode length."""
    from envs import TASK_PROMPTS, task_max_episode_steps, task_names

    table = Table("task", "prompt", "max steps")
    for task in task_names():
        table.add_row(task, TASK_PROMPTS[task], str(task_max_episode_steps(task)))
    console.print(table)


@app.command()
def render(
    task: Annotated[str, typer.Option(help="Meta-World task")] = "pick-place-v3",
    cameras: Annotated[str, typer.Option(help="Comma-separated camera names")] = "corner2,gripperPOV",
    size: Annotated[int, typer.Option(min=16, help="Image width and height")] = 128,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    out: Annotated[Path, typer.Option(help="PNG file (cameras side by side)")] = Path("envs_render.png"),
) -> None:
    """Render the first observation of a task, all cameras side by side, to a PNG file."""
    from PIL import Image

    from envs import EnvConfig, MetaWorldEnv

    config = EnvConfig(task=task, cameras=tuple(cameras.split(",")), width=size, height=size, seed=seed)
    env = MetaWorldEnv(config)
    try:
        obs, _ = env.reset(seed=seed)
    finally:
        env.close()
    Image.fromarray(np.concatenate([obs["images"][camera] for camera in config.cameras], axis=1)).save(out)
    console.print(f"{task}: {', '.join(config.cameras)} → {out}  (prompt: {obs['prompt']!r})")


@app.command()
def expert(
    task: Annotated[str, typer.Option(help="Meta-World task")] = "pick-place-v3",
    episodes: Annotated[int, typer.Option(min=1)] = 10,
    noise: Annotated[float, typer.Option(min=0.0, help="Gaussian action noise std")] = 0.0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Success rate and mean length of the scripted expert (image-free, for speed)."""
    from envs import EnvConfig, MetaWorldEnv, ScriptedExpert

    env = MetaWorldEnv(EnvConfig(task=task, render=False, seed=seed))
    scripted = ScriptedExpert(env.task, noise_std=noise, seed=seed)
    try:
        outcomes = [_expert_episode(env, scripted, seed + episode) for episode in range(episodes)]
    finally:
        env.close()
    successes = sum(success for success, _ in outcomes)
    lengths = [length for _, length in outcomes]
    console.print(
        f"{task} noise {noise:g}: {successes}/{episodes} successes, mean length {np.mean(lengths):.0f}"
    )


def _expert_episode(env: MetaWorldEnv, scripted: ScriptedExpert, seed: int) -> tuple[bool, int]:
    """Run one expert episode; return (success, length)."""
    obs, _ = env.reset(seed=seed)
    length, done, info = 0, False, {}
    while not done:
        obs, _, terminated, truncated, info = env.step(scripted.act(obs["privileged"]))
        length, done = length + 1, terminated or truncated
    return bool(info["success"]), length
