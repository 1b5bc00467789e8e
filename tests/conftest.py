"""Shared test set-up: headless rendering, single-threaded torch, and the PostgreSQL server under test."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest
import torch

torch.set_num_threads(1)

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_url() -> str:
    """URL of the PostgreSQL server the tests use (``FLYWHEEL_TEST_PG_URL`` overrides the default)."""
    return os.environ.get("FLYWHEEL_TEST_PG_URL", DEFAULT_PG_URL)


def postgres_required() -> bool:
    """True when PostgreSQL must be there (CI sets ``FLYWHEEL_REQUIRE_PG=1``): then an unreachable server fails."""
    return os.environ.get("FLYWHEEL_REQUIRE_PG", "") not in ("", "0")


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The reachable PostgreSQL URL; if none, a failure (``FLYWHEEL_REQUIRE_PG`` set) or a skip saying why."""
    import sqlalchemy as sa

    url = postgres_url()
    try:
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # the reason is reported in the failure or skip message
        reason = f"PostgreSQL at {url} is not reachable: {error.__class__.__name__}: {error}"
        if postgres_required():
            pytest.fail(
                f"{reason} (FLYWHEEL_REQUIRE_PG is set: the PostgreSQL tests must run)", pytrace=False
            )
        pytest.skip(reason)
    return url
