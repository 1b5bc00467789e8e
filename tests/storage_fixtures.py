"""Storage test helpers: synthetic episodes and a store fixture parametrized over SQLite and PostgreSQL.

Test modules import the fixtures: ``from tests.storage_fixtures import store, store_url  # noqa: F401``.
On PostgreSQL (the server of the lead's ``pg_url`` fixture in tests/conftest.py) each test session gets its own
database, dropped at the end; ``store_url`` is a fresh empty schema in it, ``store`` a schema migrated once and
emptied before each test.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from storage import EpisodeRecord, ExperienceStore, InterventionSegment, Outcome, StepSource
from storage.engine import create_scratch_database
from storage.records import ARRAY_FIELDS

POLICY_VERSION = "vla-v1"


def make_episode(
    rng: np.random.Generator,
    length: int = 50,
    *,
    task: str = "pick-place-v3",
    state_dim: int = 7,
    action_dim: int = 4,
    horizon: int = 5,
    cameras: tuple[str, ...] = ("corner",),
    image_size: int = 16,
    policy_version: str | None = POLICY_VERSION,
    outcome: Outcome = Outcome.SUCCESS,
    privileged: bool = True,
    run_id: str | None = None,
) -> EpisodeRecord:
    """A random but well-formed episode: chunks of ``horizon``, a human takeover in the middle, images."""
    n_chunks = -(-length // horizon)
    chunk_ids = (np.arange(length) // horizon).astype(np.int32)
    sources = np.zeros(length, dtype=np.uint8)
    interventions = []
    if length >= 10:
        start, end = length // 3, length // 3 + 4
        sources[start:end] = StepSource.HUMAN
        chunk_ids[start:end] = -1
        interventions.append(InterventionSegment(start, end, "no_progress"))
    terminated = np.zeros(length, dtype=bool)
    truncated = np.zeros(length, dtype=bool)
    if length:
        terminated[-1] = outcome == Outcome.SUCCESS
        truncated[-1] = outcome != Outcome.SUCCESS
    images = {
        camera: rng.integers(0, 4, size=(length, image_size, image_size, 3), dtype=np.uint8) * 60
        for camera in cameras
    }
    if length > 2:
        for frames in images.values():
            frames[1] = frames[0]  # a repeated frame: stored once
    return EpisodeRecord(
        uuid=uuid.UUID(bytes=rng.bytes(16), version=4),
        task=task,
        env_id=f"metaworld/{task}",
        policy_version=policy_version,
        seed=int(rng.integers(0, 2**31)),
        outcome=outcome,
        states=rng.standard_normal((length, state_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (length, action_dim)).astype(np.float32),
        rewards=rng.uniform(0, 10, length).astype(np.float32),
        terminated=terminated,
        truncated=truncated,
        sources=sources,
        policy_versions=[None if s == StepSource.HUMAN else policy_version for s in sources],
        chunk_ids=chunk_ids,
        chunk_offsets=(np.arange(length) % horizon).astype(np.int32),
        latency_ms=np.where(np.arange(length) % horizon == 0, 12.5, 0.0).astype(np.float32),
        chunks=rng.uniform(-1, 1, (n_chunks, horizon, action_dim)).astype(np.float32),
        images=images,
        privileged=rng.standard_normal((length, 39)).astype(np.float32) if privileged else None,
        interventions=interventions,
        metadata={"quality": "expert", "noise": 0.1, "tags": ["a", "b"]},
        run_id=run_id,
    )


def assert_episodes_equal(actual: EpisodeRecord, expected: EpisodeRecord, images: bool = True) -> None:
    """Field-by-field equality, arrays compared bytewise with dtype and shape."""
    for name in ARRAY_FIELDS:
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, a.shape, e.dtype, e.shape)
        assert a.tobytes() == e.tobytes(), name
    for name in ("reference_chunks",):
        a, e = getattr(actual, name), getattr(expected, name)
        assert (a is None) == (e is None), name
        if e is not None:
            assert a.dtype == e.dtype and a.shape == e.shape and a.tobytes() == e.tobytes(), name
    if expected.privileged is None:
        assert actual.privileged is None
    else:
        assert actual.privileged is not None and actual.privileged.tobytes() == expected.privileged.tobytes()
    for name in ("uuid", "task", "env_id", "policy_version", "seed", "policy_versions", "interventions"):
        assert getattr(actual, name) == getattr(expected, name), name
    for name in ("metadata", "run_id", "error", "subtasks", "prompt", "injected"):
        assert getattr(actual, name) == getattr(expected, name), name
    assert Outcome(actual.outcome) == Outcome(expected.outcome)
    if images:
        assert sorted(actual.images) == sorted(expected.images)
        for camera, frames in expected.images.items():
            assert actual.images[camera].dtype == np.uint8
            assert np.array_equal(actual.images[camera], frames), camera


def fresh_pg_database(server_url: str) -> tuple[str, Callable[[], None]]:
    """A new, empty database on the server and a function that drops it."""
    return create_scratch_database(server_url, prefix="flywheel_test")


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def pg_database(pg_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    url, drop = fresh_pg_database(pg_url)
    try:
        yield url
    finally:
        drop()


def fresh_pg_schema(database_url: str) -> tuple[str, Callable[[], None]]:
    """Create an empty schema; return a URL whose connections use it and a function that drops it."""
    name = f"s_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{name}"')

    def drop() -> None:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        admin.dispose()

    url = sa.engine.make_url(database_url).update_query_dict({"options": f"-csearch_path={name}"})
    return url.render_as_string(hide_password=False), drop


@pytest.fixture(scope="session")
def pg_migrated(pg_database: str) -> Iterator[str]:
    """A schema migrated once per session; ``store`` empties its tables before each test."""
    url, drop = fresh_pg_schema(pg_database)
    ExperienceStore(url).upgrade()
    try:
        yield url
    finally:
        drop()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL on each backend (a SQLite file in tmp_path; a fresh PostgreSQL schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    url, drop = fresh_pg_schema(request.getfixturevalue("pg_database"))
    try:
        yield url
    finally:
        drop()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExperienceStore]:
    """A migrated, empty store with ``POLICY_VERSION`` registered, on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        ExperienceStore(url).upgrade()
    else:
        url = request.getfixturevalue("pg_migrated")
        truncate_all(url)
    experience = ExperienceStore(url)
    experience.register_policy_version(POLICY_VERSION, kind="vla")
    yield experience
    experience.close()


def migrated_store(url: str) -> ExperienceStore:
    """The store at ``url``, migrated, with ``POLICY_VERSION`` registered (for tests that hand ``url`` to other
    processes)."""
    store = ExperienceStore(url)
    store.upgrade()
    store.register_policy_version(POLICY_VERSION, kind="vla")
    return store


def truncate_all(url: str) -> None:
    """Empty every store table of a PostgreSQL schema (identities restart)."""
    from storage.schema import Base

    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    engine.dispose()


def episode_for_seed(seed: int, length: int = 40) -> EpisodeRecord:
    """The deterministic episode of ``seed`` (writers in child processes and the checking parent agree)."""
    return make_episode(np.random.default_rng(seed), length, image_size=24)


def write_seeds(
    url: str, seeds: list[int], ack_path: str | None = None, ack_delay_s: float = 0.0
) -> list[bool]:
    """Child-process body: write the episode of each seed; after each commit append ``"<seed> <inserted>"``
    (``write_episode``'s result as 1 or 0; 0 is an identical resubmission) to ``ack_path``, ``ack_delay_s``
    later (the latency of an acknowledgement travelling back to a remote client)."""
    experience = ExperienceStore(url)
    ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if ack_path else None
    if ack is not None:
        os.write(ack, b"ready\n")
    results = []
    for seed in seeds:
        results.append(experience.write_episode(episode_for_seed(seed)))
        if ack is not None:
            time.sleep(ack_delay_s)
            os.write(ack, f"{seed} {int(results[-1])}\n".encode())
    return results
