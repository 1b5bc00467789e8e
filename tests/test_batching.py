"""core.batching.DynamicBatcher: the one batcher of the policy server and the Ray inference server."""

from __future__ import annotations

import asyncio

import pytest

from core.batching import DynamicBatcher


async def _batches(
    requests: list[int], fail_first: bool = False, **options: object
) -> list[list[int]]:
    """The batches ``run`` saw for ``requests`` queued at once (an int request's size is itself)."""
    seen: list[list[int]] = []
    done = asyncio.Event()

    async def run(batch: list[int]) -> None:
        seen.append(batch)
        if sum(len(b) for b in seen) == len(requests):
            done.set()
        if fail_first and len(seen) == 1:
            raise RuntimeError("a bug in run")

    batcher: DynamicBatcher[int] = DynamicBatcher(run, **options)
    for request in requests:
        await batcher.put(request)
    await asyncio.wait_for(done.wait(), 5.0)  # far below max_wait_ms: no batch waited for its deadline
    await batcher.close()
    return seen


def test_sizes_count_toward_max_batch_and_queued_requests_are_taken_first() -> None:
    batches = asyncio.run(_batches([3, 1, 3, 2, 4], max_batch=5, max_wait_ms=60_000, size=lambda r: r))
    assert batches == [[3, 1, 3], [2, 4]]  # a request may overshoot max_batch rather than be split


def test_a_batch_holding_every_client_stops_waiting() -> None:
    batches = asyncio.run(_batches([1, 1], max_batch=16, max_wait_ms=60_000, clients=lambda: 2))
    assert batches == [[1, 1]]


def test_the_wait_counts_from_arrival_and_a_failed_run_does_not_stop_batching() -> None:
    batches = asyncio.run(
        _batches([1, 1, 1], fail_first=True, max_batch=2, max_wait_ms=60_000, arrival=lambda r: 0.0)
    )
    assert batches == [[1, 1], [1]]  # arrived "long ago": the last one is not held for max_wait_ms


def test_bad_limits_are_refused() -> None:
    async def run(batch: list[int]) -> None:
        return None

    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(run, max_batch=0, max_wait_ms=1.0)
