"""Several writer processes on one store at once: nothing lost, nothing duplicated, shared UUIDs written once."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable
from typing import Any

import pytest

from storage import ExperienceStore, RunFullError
from tests import storage_fixtures
from tests.storage_fixtures import assert_episodes_equal, episode_for_seed, migrated_store, write_seeds

store_url, pg_database = storage_fixtures.store_url, storage_fixtures.pg_database

WRITERS = 4
EPISODES_PER_WRITER = 8
SHARED_SEEDS = [900, 901, 902]


def _run_in_processes(target: Callable[..., None], args: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``target(*a, results)`` in one forked process per ``a`` in ``args``, all at once; what each put on
    ``results`` (in the order they put it). Every process must exit 0."""
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = context.Queue()
    processes = [context.Process(target=target, args=(*a, results)) for a in args]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcomes


def _writer(url: str, seeds: list[int], results: multiprocessing.Queue) -> None:
    results.put((seeds, write_seeds(url, seeds)))


def test_concurrent_writer_processes_lose_nothing(store_url: str) -> None:
    store = migrated_store(store_url)
    own = [[100 * w + i for i in range(EPISODES_PER_WRITER)] for w in range(WRITERS)]
    # every writer also submits the same three episodes, interleaved with its own
    plans = [own_seeds[:4] + SHARED_SEEDS + own_seeds[4:] for own_seeds in own]
    outcomes = _run_in_processes(_writer, [(store_url, plan) for plan in plans])
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


def _claim_and_write(url: str, claims: int, limit: int, results: multiprocessing.Queue) -> None:
    """Claim ``claims`` episode indices of run ``shared``; write the episode of each, capped at ``limit``."""
    store = ExperienceStore(url)
    indices, written = [], 0
    for _ in range(claims):
        indices.append(store.claim_episode_index("shared"))
        record = episode_for_seed(5_000 + indices[-1], length=6)
        record.run_id = "shared"
        with contextlib.suppress(RunFullError):
            written += store.write_episode(record, max_run_episodes=limit)
    results.put((indices, written))


def test_concurrent_claims_get_distinct_indices_and_writes_hold_the_run_target(store_url: str) -> None:
    store = migrated_store(store_url)
    outcomes = _run_in_processes(_claim_and_write, [(store_url, 6, 10)] * WRITERS)
    indices = sorted(index for claimed, _ in outcomes for index in claimed)
    assert indices == list(range(6 * WRITERS)), "every claim got its own index, none skipped"
    assert sum(written for _, written in outcomes) == 10 == store.count_episodes(run_id="shared")
    stored = store.list_episodes(run_id="shared")[0]
    assert store.write_episode(store.load_episode(stored.uuid), max_run_episodes=10) is False  # idempotent
    late = episode_for_seed(4_999)
    with pytest.raises(ValueError, match="names no run_id"):
        store.write_episode(late, max_run_episodes=10)
    late.run_id = "shared"
    with pytest.raises(RunFullError, match="run shared: already holds 10 episodes"):
        store.write_episode(late, max_run_episodes=10)
    assert store.claim_episode_index("shared") == 6 * WRITERS
    assert store.claim_episode_index("another run") == 0
    store.close()


@pytest.fixture(autouse=True)
def _quiet_fork_warning(recwarn: pytest.WarningsRecorder) -> None:
    """Forking a process that imported torch warns about threads; the writers do not use torch."""
