"""One-line messages for invalid settings, shared by configs and commands."""

from __future__ import annotations

from pydantic import ValidationError


def first_error(error: ValidationError) -> str:
    """Pydantic's first complaint as ``field.path: message``."""
    problem = error.errors()[0]
    location = ".".join(str(part) for part in problem["loc"]) or "config"
    return f"{location}: {problem['msg'].removeprefix('Value error, ')}"
