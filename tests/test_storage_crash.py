"""SIGKILL a writer process at random points: no partial episode is ever visible, acknowledged ones survive intact.

The writer appends an episode's seed and ``write_episode``'s result to an acknowledgement file 10 ms after
``write_episode`` returned (after commit; the delay stands for the acknowledgement's trip back to a remote client).
Each restarted writer first re-sends the seed the previous one did not acknowledge, so an episode whose commit
landed just before the kill is resubmitted and must come back as an identical no-op; the test requires at least
one such no-op. Besides the kills at random moments, every fifth writer is killed only once the parent sees a
commit that is not acknowledged yet, so that window is hit even when load stretches the writes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from storage import ExperienceStore
from storage.schema import Chunk, Episode, Intervention, Step, StepImage
from tests import storage_fixtures
from tests.storage_fixtures import assert_episodes_equal, episode_for_seed, migrated_store, write_seeds

store_url, pg_database = storage_fixtures.store_url, storage_fixtures.pg_database
AIMED_EVERY = 5  # every fifth writer is killed between a commit and its acknowledgement
ACK_DELAY_S = 0.01


@dataclass
class KillReport:
    """What the killed writers did: seeds acknowledged, seeds attempted, and re-sent seeds that were no-ops."""

    acknowledged: list[int] = field(default_factory=list)
    attempted: list[int] = field(default_factory=list)
    resent_no_ops: list[int] = field(default_factory=list)


def _read_acks(path: Path) -> tuple[bool, dict[int, bool]]:
    """Whether the writer got ready, and ``{seed: inserted}`` for every acknowledged write."""
    if not path.exists():
        return False, {}
    lines = path.read_text().split("\n")[:-1]  # a torn last line (no newline) is not an acknowledgement
    acks = dict(line.split() for line in lines if line != "ready")
    return "ready" in lines, {int(seed): inserted == "1" for seed, inserted in acks.items()}


def _await_unacknowledged_commit(store: ExperienceStore, ack_path: Path, stored_before: int) -> None:
    """Poll until the store holds an episode the writer committed but has not acknowledged (at most 5 s)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stored = store.count_episodes()  # counted before the acks are read: no false alarm from a late ack
        if stored > stored_before + sum(_read_acks(ack_path)[1].values()):
            return


def _kill_writers(store: ExperienceStore, url: str, tmp_path: Path, kills: int, seed: int) -> KillReport:
    """Run ``kills`` writers, each SIGKILLed at a random moment (every ``AIMED_EVERY``-th one then also waits
    for an unacknowledged commit); each writer first re-sends the previous one's unacknowledged seed."""
    rng = np.random.default_rng(seed)
    context = multiprocessing.get_context("fork")
    report = KillReport()
    next_seed = 10_000
    pending: list[int] = []
    for run in range(kills):
        seeds = pending + list(range(next_seed, next_seed + 200))
        next_seed += 200
        ack_path = tmp_path / f"acks-{run}.txt"
        stored_before = store.count_episodes()
        writer = context.Process(target=write_seeds, args=(url, seeds, str(ack_path), ACK_DELAY_S))
        writer.start()
        deadline = time.monotonic() + 60
        while not _read_acks(ack_path)[0] and time.monotonic() < deadline and writer.is_alive():
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.6)))
        if run % AIMED_EVERY == 0:
            _await_unacknowledged_commit(store, ack_path, stored_before)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=30)
        assert writer.exitcode == -signal.SIGKILL
        _, done = _read_acks(ack_path)
        report.acknowledged += list(done)
        report.attempted += seeds[: len(done) + 1]
        assert all(inserted for s, inserted in done.items() if s not in pending)  # fresh seeds are inserted
        report.resent_no_ops += [s for s in pending if s in done and not done[s]]
        pending = [s for s in seeds[: len(done) + 1] if s not in done]
    return report


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


@pytest.mark.parametrize("kills", [25])
def test_sigkilled_writers_leave_only_whole_acknowledged_episodes(
    store_url: str, tmp_path: Path, kills: int
) -> None:
    store = migrated_store(store_url)
    report = _kill_writers(store, store_url, tmp_path, kills, seed=0)
    acknowledged, attempted = report.acknowledged, report.attempted
    assert len(set(acknowledged)) >= 5  # writers got going before they were killed
    # Some kill landed after a commit but before its acknowledgement: the re-sent episode was an identical no-op.
    assert report.resent_no_ops, "no kill fell between a commit and its acknowledgement"
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
