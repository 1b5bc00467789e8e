"""The ``flywheel`` command line: one entry point, a sub-command per room.

Each room that offers commands exposes a ``typer.Typer`` named ``app`` in ``experiments/commands/<room>.py``.
A room whose app holds a single command of its own name (``serve``) is mounted as that top-level command;
the others become command groups (``flywheel db upgrade``).

Bad input is reported in one place: an error of a type named in :data:`USER_ERRORS` (or a ``typer.BadParameter``
a command raises) that escapes a command is printed as one ``error: <message>`` line on stderr, exit code 2,
without a traceback; a pydantic ``ValidationError`` (a config model refusing an option's value) as the fields
it names. Commands build their config models without catching it. A job that failed where it ran (:data:`RUN_FAILURES`, e.g. a rollout worker's code raised)
is printed the same way with exit code 1. Everything else is a bug and keeps its traceback.

Start-up stays light: ``flywheel --help`` and every command module import only typer, rich, pydantic and light
flywheel modules at module level. **A command imports torch, mujoco/envs, mlflow, Ray, sqlalchemy/storage and
anything that pulls them in inside its function body** (``from experiments.training import train_vla`` as the
first lines of the command), so one command never pays for another's libraries. The error types below are
named by string for the same reason; ``tests/test_cli_errors.py`` checks that ``flywheel --help`` loads none of
the heavy libraries.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import typer
from typer.core import TyperGroup

from experiments.validation import every_error

os.environ.setdefault("MUJOCO_GL", "egl")

#: pydantic's error for settings that fail validation (an option value a config model refuses): reported as every
#: field it names (``experiments.validation.every_error``).
VALIDATION_ERROR = "pydantic_core._pydantic_core.ValidationError"
#: Errors that describe bad input in one line naming it: printed as ``error: …``, exit code 2. Named as
#: ``module.Class`` (where the class is defined) so that matching imports nothing: an error whose module was
#: never imported was never raised.
USER_ERRORS: tuple[str, ...] = (
    "experiments.validation.UserError",
    "storage.errors.StoreError",
    "storage.records.EpisodeValidationError",
    "policies.checkpoint.CheckpointError",
    "experiments.policy_loader.PolicySpecError",
    "actors.execution.ExecutionConfigError",
    "envs.tasks.UnknownTaskError",
    "experiments.pipeline_config.PipelineConfigError",
    "experiments.export.ExportError",
    "policies.openpi_client.ServerError",
    "policies.serving.server.ServerStartError",
    "actors.robot_runtime.RobotCamerasError",
    "experiments.lerobot.LeRobotFormatError",
    "rlt.errors.RLTCheckpointError",
    VALIDATION_ERROR,
)

#: Errors of a job that failed where it ran (not bad input): printed as ``error: …``, exit code 1.
RUN_FAILURES: tuple[str, ...] = ("actors.errors.WorkerError", "actors.errors.ClusterConnectionError")


def is_one_of(error: BaseException, names: tuple[str, ...]) -> bool:
    """Whether ``error`` is an instance of a class named (``module.Class``) in ``names``."""
    return any(f"{cls.__module__}.{cls.__qualname__}" in names for cls in type(error).__mro__)


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
        except Exception as error:
            if is_one_of(error, RUN_FAILURES):
                _report(str(error))
                raise typer.Exit(1) from None
            if not is_one_of(error, USER_ERRORS):
                raise
            message = every_error(error) if is_one_of(error, (VALIDATION_ERROR,)) else str(error)
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

#: Command modules, each imported at start-up: keep their module-level imports light (see the module docstring).
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
    "import",
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
