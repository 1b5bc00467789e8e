"""Schedules: run one iteration now (``--once``, cron-friendly) or one every interval (``--every 6h``).

The schedule is derived from the store, so it survives restarts: an unfinished iteration is resumed at once,
and the next one is due ``interval`` after the last finished iteration's deploy record. A lock file keeps two
schedulers of the same pipeline from running stages concurrently.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from experiments.pipeline import IterationState, Pipeline

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ScheduleError(ValueError):
    """A bad interval, or another scheduler holds the pipeline's lock."""


def parse_interval(text: str) -> float:
    """``"6h"``, ``"30m"``, ``"90s"``, ``"1d"``, ``"1h30m"`` → seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ScheduleError(f"--every: expected a duration like 6h, 30m, 90s or 1h30m, got {text!r}")
    seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise ScheduleError(f"--every: expected a positive duration, got {text!r}")
    return seconds


@contextmanager
def pipeline_lock(pipeline: Pipeline) -> Iterator[Path]:
    """Hold the pipeline's lock file (non-blocking: a second holder gets a ``ScheduleError``)."""
    path = pipeline.home / "iterate.lock"
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise ScheduleError(
                f"pipeline {pipeline.config.name!r} is already being iterated (lock {path} is held)"
            ) from error
        yield path


def next_due(pipeline: Pipeline, interval: float) -> dt.datetime:
    """When the next iteration should start: now if one is unfinished or none ran, else last finish + interval."""
    states = pipeline.iterations()
    if not states or not states[-1].finished:
        return dt.datetime.now(dt.UTC)
    finished = pipeline.finished_at(states[-1].iteration)
    return finished + dt.timedelta(seconds=interval)


def run_every(
    pipeline: Pipeline,
    interval: float,
    max_iterations: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_iteration: Callable[[IterationState], None] | None = None,
) -> list[IterationState]:
    """Run iterations every ``interval`` seconds (forever, or ``max_iterations`` of them)."""
    done: list[IterationState] = []
    with pipeline_lock(pipeline):
        while max_iterations is None or len(done) < max_iterations:
            wait = (next_due(pipeline, interval) - dt.datetime.now(dt.UTC)).total_seconds()
            if wait > 0:
                sleep(wait)
            state = pipeline.run_iteration()
            done.append(state)
            if on_iteration is not None:
                on_iteration(state)
    return done


def run_once(pipeline: Pipeline) -> IterationState:
    """Resume the unfinished iteration or run a new one, under the pipeline's lock."""
    with pipeline_lock(pipeline):
        return pipeline.run_iteration()
