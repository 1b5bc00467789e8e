"""Several writer processes on one store at once: nothing lost, nothing duplicated, shared UUIDs written once."""

from __future__ import annotations

import multiprocessing

import pytest

from storage import ExperienceStore
from tests import storage_fixtures
from tests.storage_fixtures import POLICY_VERSION, assert_episodes_equal, episode_for_seed, write_seeds

store_url, pg_database = storage_fixtures.store_url, storage_fixtures.pg_database

WRITERS = 4
EPISODES_PER_WRITER = 8
SHARED_SEEDS = [900, 901, 902]


def _writer(url: str, seeds: list[int], results: multiprocessing.Queue) -> None:
    results.put((seeds, write_seeds(url, seeds)))


def test_concurrent_writer_processes_lose_nothing(store_url: str) -> None:
    store = ExperienceStore(store_url)
    store.upgrade()
    store.register_policy_version(POLICY_VERSION, kind="vla")
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = context.Queue()
    own = [[100 * w + i for i in range(EPISODES_PER_WRITER)] for w in range(WRITERS)]
    # every writer also submits the same three episodes, interleaved with its own
    plans = [own_seeds[:4] + SHARED_SEEDS + own_seeds[4:] for own_seeds in own]
    writers = [context.Process(target=_writer, args=(store_url, plan, results)) for plan in plans]
    for process in writers:
        process.start()
    outcomes = [results.get(timeout=240) for _ in writers]
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0
    inserted: dict[int, int] = {}
    for seeds, flags in outcomes:
        for seed, flag in zip(seeds, flags, strict=True):
            inserted[seed] = inserted.get(seed, 0) + int(flag)
    assert all(inserted[seed] == 1 for seed in SHARED_SEEDS), inserted
    assert all(inserted[seed] == 1 for seeds in own for seed in seeds)
    expected = [seed for seeds in own for seed in seeds] + SHARED_SEEDS
    stats = store.stats()
    assert stats["episodes"] == len(expected) and stats["steps"] == 40 * len(expected)
    for seed in expected:
        record = episode_for_seed(seed)
        assert_episodes_equal(store.load_episode(record.uuid), record)
    store.close()


@pytest.fixture(autouse=True)
def _quiet_fork_warning(recwarn: pytest.WarningsRecorder) -> None:
    """Forking a process that imported torch warns about threads; the writers do not use torch."""
