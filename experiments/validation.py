"""One-line messages for invalid settings, shared by configs and commands."""

from __future__ import annotations

from pydantic import ValidationError


class UserError(ValueError):
    """Bad input (an option, a file, a folder) described in one line that names it and what was expected.

    The ``flywheel`` CLI prints it as ``error: <message>`` and exits 2 (``experiments.cli``).
    """


def first_error(error: ValidationError) -> str:
    """Pydantic's first complaint as ``field.path: message``."""
    problem = error.errors()[0]
    location = ".".join(str(part) for part in problem["loc"]) or "config"
    message = problem["msg"].removeprefix("Value error, ")
    if problem["loc"]:  # our validators' messages start with the field's name already
        message = message.removeprefix(f"{problem['loc'][-1]}: ")
    return f"{location}: {message}"
