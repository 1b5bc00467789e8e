"""Dynamic batching: the one batcher behind the policy server and the Ray inference server (asyncio only).

Requests are queued as they arrive; a batch starts with the first waiting one and grows, taking whatever is
already queued first, until its total size reaches ``max_batch``, ``max_wait_ms`` have passed since the first
request arrived, or every client that could still send has a request in it. Each batch goes to ``run`` while
the next one gathers; ``run`` answers the requests (it resolves their futures), one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Request = TypeVar("Request")


class DynamicBatcher(Generic[Request]):
    """Gathers queued requests into batches and hands each batch to ``run``.

    ``size`` counts a request's items toward ``max_batch`` (default 1 each; a request may overshoot the limit
    rather than be split). ``arrival`` says when a request started waiting (a ``time.monotonic()`` value;
    default: when the batcher took it off the queue), from which ``max_wait_ms`` counts. ``clients`` returns how
    many requests can be outstanding at once (e.g. open lock-step connections): a batch holding that many stops
    waiting, since nothing more can come. ``run`` must answer every request of its batch; an exception it lets
    through is logged and batching goes on.
    """

    def __init__(
        self,
        run: Callable[[list[Request]], Awaitable[None]],
        max_batch: int,
        max_wait_ms: float,
        *,
        size: Callable[[Request], int] = lambda request: 1,
        arrival: Callable[[Request], float] | None = None,
        clients: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be ≥ 1 and max_wait_ms ≥ 0, got {max_batch} and {max_wait_ms}")
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self._run = run
        self._size = size
        self._arrival = arrival
        self._clients = clients
        self._queue: asyncio.Queue[Request] | None = None
        self._task: asyncio.Task | None = None

    async def put(self, request: Request) -> None:
        """Queue ``request`` (the first call starts batching on the running event loop)."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._batch_forever(), name="dynamic-batcher")
        assert self._queue is not None
        self._queue.put_nowait(request)

    async def close(self) -> None:
        """Stop batching (requests still queued are dropped; a batch in ``run`` is cancelled); a later
        :meth:`put` starts afresh."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _batch_forever(self) -> None:
        while True:
            batch = await self._gather()
            try:
                await self._run(batch)
            except Exception:
                logger.exception("batch of %d requests failed", len(batch))

    async def _gather(self) -> list[Request]:
        assert self._queue is not None
        queue = self._queue
        first = await queue.get()
        batch, count = [first], self._size(first)
        started = self._arrival(first) if self._arrival is not None else time.monotonic()
        deadline = started + self.max_wait_ms / 1e3
        while count < self.max_batch:
            if queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._clients is not None and len(batch) >= self._clients()):
                    break
                try:
                    request = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                request = queue.get_nowait()
            batch.append(request)
            count += self._size(request)
        return batch
