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


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The reachable PostgreSQL URL, or a skip that says why no server could be used."""
    import sqlalchemy as sa

    url = postgres_url()
    try:
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # the reason is reported in the skip message
        pytest.skip(f"PostgreSQL at {url} is not reachable: {error.__class__.__name__}: {error}")
    return url
