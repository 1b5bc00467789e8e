"""Write throughput of the experience store vs the raw driver writing the same rows, in the same run.

Episodes of 500 steps (7-D state, 4-D action, 39-D privileged state, 10-step chunks) are written one
transaction per episode. Baselines insert exactly the rows the store inserts (episode, chunks, steps, and with
images the compressed images + step↔image refs), precomputed outside the timed loop:
  * SQLite: ``sqlite3.executemany`` on a database with the same schema and pragmas (WAL, foreign keys on).
  * PostgreSQL: psycopg ``COPY`` of the same rows.
The store's time includes everything it does per episode: validation, content hashing, image hashing and
compression, the duplicate check and the inserts. Targets: SQLite ≥ 0.6×, PostgreSQL ≥ 0.5× the baseline.

    python benchmarks/store_write.py [--episodes 20] [--image-episodes 6] [--rounds 3] [--pg-url URL | --no-pg]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psycopg
import sqlalchemy as sa

from storage import EpisodeRecord, ExperienceStore, Outcome
from storage.codec import IMAGE_CODEC, content_hash, image_hash
from storage.engine import create_scratch_database


class Timing(NamedTuple):
    """Wall-clock and this process's CPU seconds of one measured loop."""

    wall: float
    cpu: float


class Timer:
    """Measures wall and process CPU time of a ``with`` block into ``timing``."""

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.timing = Timing(time.perf_counter() - self._wall, time.process_time() - self._cpu)


LENGTH = 500
HORIZON = 10
VERSION = "bench-v1"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def make_episode(rng: np.random.Generator, images: bool) -> EpisodeRecord:
    """A 500-step episode; with ``images``, smooth 96×96 frames with a moving block (compressible like renders)."""
    frames: dict[str, np.ndarray] = {}
    if images:
        y, x = np.mgrid[0:96, 0:96]
        base = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.uint8)
        video = np.repeat(base[None], LENGTH, axis=0)
        for t in range(LENGTH):
            row = (t + int(rng.integers(0, 50))) % 80
            video[t, row : row + 16, 30:50] = (200, 40, 40)
        frames["corner"] = video
    return EpisodeRecord(
        uuid=uuid.UUID(bytes=rng.bytes(16), version=4),
        task="pick-place-v3",
        env_id="metaworld/pick-place-v3",
        policy_version=VERSION,
        seed=int(rng.integers(0, 2**31)),
        outcome=Outcome.TRUNCATED,
        states=rng.standard_normal((LENGTH, 7)).astype(np.float32),
        actions=rng.uniform(-1, 1, (LENGTH, 4)).astype(np.float32),
        rewards=rng.uniform(0, 10, LENGTH).astype(np.float32),
        terminated=np.zeros(LENGTH, dtype=bool),
        truncated=np.arange(LENGTH) == LENGTH - 1,
        sources=np.zeros(LENGTH, dtype=np.uint8),
        policy_versions=[VERSION] * LENGTH,
        chunk_ids=(np.arange(LENGTH) // HORIZON).astype(np.int32),
        chunk_offsets=(np.arange(LENGTH) % HORIZON).astype(np.int32),
        latency_ms=np.where(np.arange(LENGTH) % HORIZON == 0, 15.0, 0.0).astype(np.float32),
        chunks=rng.uniform(-1, 1, (LENGTH // HORIZON, HORIZON, 4)).astype(np.float32),
        images=frames,
        privileged=rng.standard_normal((LENGTH, 39)).astype(np.float32),
        metadata={"quality": "bench"},
    )


def raw_rows(record: EpisodeRecord, episode_id: int, version_id: int) -> dict[str, list[tuple[Any, ...]]]:
    """The rows the store writes for ``record``, as plain tuples (images compressed here, outside timing)."""
    frame_hashes = {camera: [image_hash(f) for f in frames] for camera, frames in record.images.items()}
    episode = (
        episode_id,
        str(record.uuid).replace("-", ""),
        record.task,
        record.env_id,
        version_id,
        record.seed,
        str(record.outcome),
        record.length,
        float(record.rewards.sum()),
        0,
        7,
        4,
        39,
        HORIZON,
        json.dumps(record.metadata),
        content_hash(record, frame_hashes),
        "2026-01-01 00:00:00",
    )
    steps = [
        (
            episode_id,
            t,
            record.states[t].tobytes(),
            record.actions[t].tobytes(),
            record.privileged[t].tobytes(),
            float(record.rewards[t]),
            bool(record.terminated[t]),
            bool(record.truncated[t]),
            int(record.sources[t]),
            version_id,
            int(record.chunk_ids[t]),
            int(record.chunk_offsets[t]),
            float(record.latency_ms[t]),
        )
        for t in range(record.length)
    ]
    chunks = [(episode_id, i, HORIZON, chunk.tobytes()) for i, chunk in enumerate(record.chunks)]
    images, frames_by_hash, refs = {}, {}, []
    for camera, frames in record.images.items():
        for t, (frame, digest) in enumerate(zip(frames, frame_hashes[camera], strict=True)):
            frames_by_hash[digest] = frame
            images.setdefault(digest, (digest, IMAGE_CODEC, 96, 96, 3, zlib.compress(frame.tobytes(), 1)))
            refs.append((episode_id, t, camera, digest))
    return {
        "episode": [episode],
        "chunks": chunks,
        "steps": steps,
        "images": list(images.values()),
        "frames": list(frames_by_hash.items()),
        "refs": refs,
    }


EPISODE_COLUMNS = (
    "id, uuid, task, env_id, policy_version_id, seed, outcome, length, total_reward, human_steps, state_dim, "
    "action_dim, privileged_dim, chunk_horizon, metadata, content_hash, created_at"
)
STEP_COLUMNS = (
    "episode_id, t, state, action, privileged, reward, terminated, truncated, source, policy_version_id, "
    "chunk_index, chunk_offset, latency_ms"
)


def time_store(url: str, episodes: list[EpisodeRecord]) -> Timing:
    """Seconds to write ``episodes`` through ``ExperienceStore`` into a freshly migrated database."""
    store = ExperienceStore(url)
    store.upgrade()
    store.register_policy_version(VERSION, kind="bench")
    with Timer() as timer:
        for record in episodes:
            assert store.write_episode(record)
    assert store.count_episodes() == len(episodes)
    store.close()
    return timer.timing


def time_sqlite_raw(path: Path, rows: list[dict[str, list[Any]]], compress: bool = False) -> Timing:
    """Seconds for ``sqlite3.executemany`` of the same rows, one transaction per episode, same schema/pragmas.

    With ``compress`` the image blobs are compressed inside the timed loop (zlib level 1, one thread).
    """
    store = ExperienceStore(f"sqlite:///{path}")
    store.upgrade()
    store.register_policy_version(VERSION, kind="bench")
    store.close()
    connection = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
        connection.execute(f"PRAGMA {pragma}")
    with Timer() as timer:
        for episode in rows:
            _insert_raw(connection, episode, compress)
    connection.close()
    return timer.timing


def _insert_raw(connection: sqlite3.Connection, episode: dict[str, list[Any]], compress: bool) -> None:
    """One episode's rows in one transaction, through ``sqlite3`` only."""
    connection.execute("BEGIN IMMEDIATE")
    connection.executemany(
        f"INSERT INTO episodes ({EPISODE_COLUMNS}) VALUES ({_marks(17)})", episode["episode"]
    )
    connection.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?)", episode["chunks"])
    connection.executemany(f"INSERT INTO steps ({STEP_COLUMNS}) VALUES ({_marks(13)})", episode["steps"])
    images = episode["images"]
    if compress:
        images = [(d, IMAGE_CODEC, 96, 96, 3, zlib.compress(f.tobytes(), 1)) for d, f in episode["frames"]]
    connection.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, ?, ?)", images)
    connection.executemany("INSERT INTO step_images VALUES (?, ?, ?, ?)", episode["refs"])
    connection.execute("COMMIT")


def time_pg_copy(url: str, rows: list[dict[str, list[tuple[Any, ...]]]]) -> Timing:
    """Seconds for psycopg ``COPY`` of the same rows, one transaction per episode, same schema."""
    store = ExperienceStore(url)
    store.upgrade()
    store.register_policy_version(VERSION, kind="bench")
    store.close()
    conninfo = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as connection, Timer() as timer:
        for episode in rows:
            with connection.transaction(), connection.cursor() as cursor:
                _copy(cursor, f"episodes ({EPISODE_COLUMNS})", episode["episode"])
                _copy(cursor, "chunks", episode["chunks"])
                _copy(cursor, f"steps ({STEP_COLUMNS})", episode["steps"])
                if episode["images"]:
                    cursor.executemany(
                        "INSERT INTO images VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        episode["images"],
                    )
                _copy(cursor, "step_images", episode["refs"])
    return timer.timing


def _copy(cursor: psycopg.Cursor, target: str, rows: list[tuple[Any, ...]]) -> None:
    with cursor.copy(f"COPY {target} FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def fresh_pg_database(server_url: str) -> tuple[str, Callable[[], None]]:
    """A new, empty database on the server and a function that drops it."""
    return create_scratch_database(server_url, prefix="flywheel_bench")


def report(
    label: str, steps: int, store: Timing, base: Timing, name: str, target: float | None, cpu: bool
) -> None:
    """Print both throughputs (wall clock) and their ratio; with ``cpu`` also the ratio of process CPU time."""
    ratio = base.wall / store.wall
    verdict = "" if target is None else f" ({'meets' if ratio >= target else 'MISSES'} target {target}x)"
    cpu_ratio = f"; CPU-time ratio {base.cpu / store.cpu:.2f}x" if cpu else ""
    print(
        f"{label:<20} store {steps / store.wall:>7,.0f} steps/s | {name:<26} {steps / base.wall:>7,.0f} steps/s"
        f" | ratio {ratio:.2f}x{verdict}{cpu_ratio}"
    )


def interleaved(
    rounds: int, store: Callable[[int], Timing], baseline: Callable[[int], Timing]
) -> tuple[Timing, Timing]:
    """Best (minimum) times of each over ``rounds`` alternating runs, so both see the same machine load."""
    store_times, baseline_times = [], []
    for i in range(rounds):
        baseline_times.append(baseline(i))
        store_times.append(store(i))
    best = [
        Timing(min(t.wall for t in times), min(t.cpu for t in times))
        for times in (store_times, baseline_times)
    ]
    return best[0], best[1]


def run(n_episodes: int, n_image_episodes: int, pg_url: str | None, seed: int, rounds: int) -> None:
    rng = np.random.default_rng(seed)
    plain = [make_episode(rng, images=False) for _ in range(n_episodes)]
    with_images = [make_episode(rng, images=True) for _ in range(n_image_episodes)]
    plain_rows = [raw_rows(e, i + 1, 1) for i, e in enumerate(plain)]
    image_rows = [raw_rows(e, i + 1, 1) for i, e in enumerate(with_images)]
    print(
        f"{n_episodes} episodes × {LENGTH} steps (+ {n_image_episodes} with one 96×96×3 camera), "
        f"best of {rounds} rounds, seed {seed}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, episodes, rows in (
            ("sqlite", plain, plain_rows),
            ("sqlite + images", with_images, image_rows),
        ):
            steps = sum(e.length for e in episodes)
            store, raw = interleaved(
                rounds,
                lambda i, e=episodes, n=label: time_store(f"sqlite:///{folder}/s-{n}-{i}.db", e),
                lambda i, r=rows, n=label: time_sqlite_raw(folder / f"raw-{n}-{i}.db", r),
            )
            report(label, steps, store, raw, "sqlite3.executemany", 0.6, cpu=True)
            if label.endswith("images"):
                store, raw_z = interleaved(
                    rounds,
                    lambda i, e=episodes: time_store(f"sqlite:///{folder}/sz-{i}.db", e),
                    lambda i, r=rows: time_sqlite_raw(folder / f"rawz-{i}.db", r, compress=True),
                )
                report(label, steps, store, raw_z, "sqlite3.executemany + zlib", 0.6, cpu=True)
        read_benchmark(f"sqlite:///{folder}/s-sqlite-0.db", folder / "s-sqlite-0.db", plain, rounds)
    if pg_url is None:
        return
    for label, episodes, rows in (
        ("postgresql", plain, plain_rows),
        ("postgresql + images", with_images, image_rows),
    ):
        steps = sum(e.length for e in episodes)
        store, raw = interleaved(
            rounds,
            lambda _i, e=episodes: on_fresh_pg(pg_url, lambda url, e=e: time_store(url, e)),
            lambda _i, r=rows: on_fresh_pg(pg_url, lambda url, r=r: time_pg_copy(url, r)),
        )
        report(label, steps, store, raw, "psycopg COPY", 0.5, cpu=False)


def read_benchmark(url: str, path: Path, episodes: list[EpisodeRecord], rounds: int) -> None:
    """load_episode (no images) vs a raw SELECT of the same step rows + np.frombuffer; then sampling rate."""
    store = ExperienceStore(url)
    uuids = [e.uuid for e in episodes]

    def through_store(_i: int) -> Timing:
        with Timer() as timer:
            for episode_uuid in uuids:
                store.load_episode(episode_uuid, images=False)
        return timer.timing

    def raw(_i: int) -> Timing:
        connection = sqlite3.connect(path)
        with Timer() as timer:
            for episode_uuid in uuids:
                _select_raw(connection, episode_uuid)
        connection.close()
        return timer.timing

    steps = sum(e.length for e in episodes)
    report(
        "sqlite load_episode",
        steps,
        *interleaved(rounds, through_store, raw),
        "raw SELECT + frombuffer",
        None,
        cpu=True,
    )
    rng = np.random.default_rng(0)
    store.sample_transitions(256, rng, n_step=10)  # builds the in-memory index
    start = time.perf_counter()
    batches = 200
    for _ in range(batches):
        store.sample_transitions(256, rng, n_step=10, refresh=False)
    per_batch = (time.perf_counter() - start) / batches
    print(
        f"sample_transitions(256, n_step=10, refresh=False): {per_batch * 1e3:.2f} ms per batch ({256 / per_batch:,.0f} windows/s)"
    )
    store.close()


def _select_raw(connection: sqlite3.Connection, episode_uuid: uuid.UUID) -> None:
    """Load one episode's step arrays with ``sqlite3`` and numpy only."""
    (episode_id,) = connection.execute(
        "SELECT id FROM episodes WHERE uuid = ?", (episode_uuid.hex,)
    ).fetchone()
    rows = connection.execute(
        "SELECT state, action, privileged, reward, terminated, truncated, source, chunk_index, chunk_offset, "
        "latency_ms FROM steps WHERE episode_id = ? ORDER BY t",
        (episode_id,),
    ).fetchall()
    columns = list(zip(*rows, strict=True))
    for blobs in columns[:3]:
        np.frombuffer(b"".join(blobs), dtype=np.float32)
    for values in columns[3:]:
        np.array(values)


def on_fresh_pg(server_url: str, measure: Callable[[str], Timing]) -> Timing:
    """Run ``measure`` on a new database of the server and drop it afterwards."""
    url, drop = fresh_pg_database(server_url)
    try:
        return measure(url)
    finally:
        drop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--image-episodes", type=int, default=6)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run(args.episodes, args.image_episodes, None if args.no_pg else args.pg_url, args.seed, args.rounds)


if __name__ == "__main__":
    main()
