"""SIGKILL a writer process at random points: no partial episode is ever visible, acknowledged ones survive intact.

The writer appends an episode's seed to an acknowledgement file only after ``write_episode`` returned (after
commit). Each restarted writer first retries the seeds the previous one did not acknowledge, so episodes whose
commit landed just before the kill are resubmitted and must come back as identical no-ops.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from storage import ExperienceStore
from storage.schema import Chunk, Episode, Intervention, Step, StepImage
from tests import storage_fixtures
from tests.storage_fixtures import POLICY_VERSION, assert_episodes_equal, episode_for_seed, write_seeds

store_url, pg_database = storage_fixtures.store_url, storage_fixtures.pg_database


def _read_acks(path: Path) -> tuple[bool, list[int]]:
    if not path.exists():
        return False, []
    lines = path.read_text().split("\n")[:-1]  # a torn last line (no newline) is not an acknowledgement
    return "ready" in lines, [int(line) for line in lines if line != "ready"]


def _kill_writers(url: str, tmp_path: Path, kills: int, seed: int) -> tuple[list[int], list[int]]:
    """Run ``kills`` writers, each SIGKILLed at a random moment; return (acknowledged, attempted) seeds."""
    rng = np.random.default_rng(seed)
    context = multiprocessing.get_context("fork")
    acknowledged: list[int] = []
    attempted: list[int] = []
    next_seed = 10_000
    pending: list[int] = []
    for run in range(kills):
        seeds = pending + list(range(next_seed, next_seed + 200))
        next_seed += 200
        ack_path = tmp_path / f"acks-{run}.txt"
        writer = context.Process(target=write_seeds, args=(url, seeds, str(ack_path)))
        writer.start()
        deadline = time.monotonic() + 60
        while not _read_acks(ack_path)[0] and time.monotonic() < deadline and writer.is_alive():
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.6)))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=30)
        assert writer.exitcode == -signal.SIGKILL
        _, done = _read_acks(ack_path)
        acknowledged += done
        attempted += seeds[: len(done) + 1]
        pending = [s for s in seeds[: len(done) + 1] if s not in done]
    return acknowledged, attempted


def _assert_no_partial_episode(url: str) -> None:
    """Every stored episode has all its steps, chunks, image refs and intervention rows."""
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        for model, expected in ((Step, Episode.length), (StepImage, Episode.length)):
            rows = connection.execute(
                sa.select(Episode.id, expected, sa.func.count(model.t))
                .outerjoin(model, model.episode_id == Episode.id)
                .group_by(Episode.id, expected)
            ).all()
            assert all(count == length for _, length, count in rows), (model.__name__, rows)
        for model in (Chunk, Intervention):
            orphans = connection.scalar(
                sa.select(sa.func.count())
                .select_from(model)
                .where(~model.episode_id.in_(sa.select(Episode.id)))
            )
            assert orphans == 0
    engine.dispose()


@pytest.mark.parametrize("kills", [20])
def test_sigkilled_writers_leave_only_whole_acknowledged_episodes(
    store_url: str, tmp_path: Path, kills: int
) -> None:
    store = ExperienceStore(store_url)
    store.upgrade()
    store.register_policy_version(POLICY_VERSION, kind="vla")
    acknowledged, attempted = _kill_writers(store_url, tmp_path, kills, seed=0)
    assert len(set(acknowledged)) >= 5  # writers got going before they were killed
    _assert_no_partial_episode(store_url)
    stored = {summary.uuid for summary in store.list_episodes()}
    expected_by_uuid = {episode_for_seed(seed).uuid: seed for seed in attempted}
    assert stored <= expected_by_uuid.keys()  # nothing but what was submitted
    for seed in acknowledged:
        assert episode_for_seed(seed).uuid in stored
    for episode_uuid in stored:  # acknowledged or committed-before-kill: whole and byte-identical
        assert_episodes_equal(
            store.load_episode(episode_uuid), episode_for_seed(expected_by_uuid[episode_uuid])
        )
    if store.dialect == "sqlite":
        engine = sa.create_engine(store_url)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        engine.dispose()
    store.close()
