"""The ``flywheel`` command line: one entry point, a sub-command per room.

Each room that offers commands exposes a ``typer.Typer`` named ``app`` in ``experiments/commands/<room>.py``.
A room whose app holds a single command of its own name (``serve``) is mounted as that top-level command;
the others become command groups (``flywheel db upgrade``).
"""

from __future__ import annotations

import importlib
import os

import typer

os.environ.setdefault("MUJOCO_GL", "egl")

app = typer.Typer(
    name="flywheel",
    help="Reinforcement learning from deployment for robot foundation policies: deploy → collect → relabel → improve.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

COMMAND_MODULES: tuple[str, ...] = (
    "collect",
    "db",
    "episodes",
    "envs",
    "train",
    "recap",
    "rlt",
    "serve",
    "robot",
    "iterate",
    "demo",
    "dashboard",
    "export",
)


def _mount(module_name: str) -> None:
    """Attach ``experiments.commands.<module_name>.app`` to the root app, if that room offers commands yet."""
    try:
        module = importlib.import_module(f"experiments.commands.{module_name}")
    except ModuleNotFoundError as error:
        if error.name == f"experiments.commands.{module_name}":
            return
        raise
    sub_app: typer.Typer = module.app
    commands = sub_app.registered_commands
    if len(commands) == 1 and not sub_app.registered_groups and (commands[0].name or "") == module_name:
        app.command(name=module_name, help=commands[0].help)(commands[0].callback)
    else:
        app.add_typer(sub_app, name=module_name)


for _name in COMMAND_MODULES:
    _mount(_name)


if __name__ == "__main__":
    app()
