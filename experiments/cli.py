"""The ``flywheel`` command line: one entry point, a sub-command per room.

Each room that offers commands exposes a ``typer.Typer`` named ``app`` in ``experiments/commands/<room>.py``.
A room whose app holds a single command of its own name (``serve``) is mounted as that top-level command;
the others become command groups (``flywheel db upgrade``).

Bad input is reported in one place: an error of a type in :data:`USER_ERRORS` (or a ``typer.BadParameter`` a
command raises) that escapes a command is printed as one ``error: <message>`` line on stderr, exit code 2,
without a traceback. A job that failed where it ran (:data:`RUN_FAILURES`, e.g. a rollout worker's code raised)
is printed the same way with exit code 1. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import typer
from typer.core import TyperGroup

from actors.errors import WorkerError
from actors.execution import ExecutionConfigError
from envs.tasks import UnknownTaskError
from experiments.export import ExportError
from experiments.pipeline_config import PipelineConfigError
from experiments.policy_loader import PolicySpecError
from experiments.validation import UserError
from policies.checkpoint import CheckpointError
from policies.openpi_client import ServerError
from policies.serving.server import ServerStartError
from storage import EpisodeValidationError, StoreError

os.environ.setdefault("MUJOCO_GL", "egl")

#: Errors that describe bad input in one line naming it: printed as ``error: …``, exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (
    UserError,
    StoreError,
    EpisodeValidationError,
    CheckpointError,
    PolicySpecError,
    ExecutionConfigError,
    UnknownTaskError,
    PipelineConfigError,
    ExportError,
    ServerError,
    ServerStartError,
)

#: Errors of a job that failed where it ran (not bad input): printed as ``error: …``, exit code 1.
RUN_FAILURES: tuple[type[Exception], ...] = (WorkerError,)


class FlywheelGroup(TyperGroup):
    """The root command group: bad input raised anywhere below it becomes one ``error:`` line and exit 2."""

    def invoke(self, ctx: Any) -> Any:
        """Run the sub-command; report a user error in one line instead of a traceback."""
        try:
            return super().invoke(ctx)
        except typer.BadParameter as error:
            if error.param is not None:  # the parser's own complaint about an option keeps its usage panel
                raise
            message = error.message
        except USER_ERRORS as error:
            message = str(error)
        except RUN_FAILURES as error:
            _report(str(error))
            raise typer.Exit(1) from None
        _report(message)
        raise typer.Exit(2)


def _report(message: str) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)


app = typer.Typer(
    cls=FlywheelGroup,
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
