"""One-line messages for invalid settings, shared by configs, commands and the CLI's root error handler."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import ErrorDetails


class UserError(ValueError):
    """Bad input (an option, a file, a folder) described in one line that names it and what was expected.

    The ``flywheel`` CLI prints it as ``error: <message>`` and exits 2 (``experiments.cli``).
    """


def first_error(error: ValidationError) -> str:
    """Pydantic's first complaint as ``field.path: message``."""
    return _problem(error.errors()[0])


def every_error(error: ValidationError, most: int = 3) -> str:
    """Pydantic's complaints on one line, ``field.path: message`` each (at most ``most``, then how many more)."""
    problems = list(dict.fromkeys(_problem(problem) for problem in error.errors()))
    more = f" (and {len(problems) - most} more)" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


def _problem(problem: ErrorDetails) -> str:
    """``field.path: message``; our validators' messages start with the field's name already, and a model
    validator's (no location) is its message as raised."""
    ours = problem["msg"].startswith("Value error, ")
    message = problem["msg"].removeprefix("Value error, ")
    if not problem["loc"]:
        return message if ours else f"config: {message}"
    field = problem["loc"][-1]
    return f"{'.'.join(str(part) for part in problem['loc'])}: {message.removeprefix(f'{field}: ')}"
