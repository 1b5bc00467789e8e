"""The upload client: exactly-once delivery across ingest outages, a SIGKILLed uploader, and refusals (a refused
or persistently failing episode never blocks the rest of the queue)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import sqlalchemy as sa

from actors.upload import UploadAuthError, UploadConfig, Uploader
from experiments.ingest import IngestConfig, IngestServer
from storage.records import EpisodeRecord
from storage.spool import EpisodeSpool, SpoolStatus, encode_episode
from storage.store import ExperienceStore
from tests.storage_fixtures import pg_database, store_url  # noqa: F401 (fixtures: both store backends)
from tests.test_spool import make_record

KEY = "upload-secret"


class SlowAckStore(ExperienceStore):
    """Commits, then waits before the ingest endpoint can acknowledge: the window a crash can hit."""

    ack_delay_s = 0.4

    def write_episode(self, record: EpisodeRecord) -> bool:
        inserted = super().write_episode(record)
        time.sleep(self.ack_delay_s)
        return inserted


def _store(tmp_path: Path, cls: type[ExperienceStore] = ExperienceStore) -> ExperienceStore:
    store = cls(f"sqlite:///{tmp_path / 'fw.db'}")
    store.upgrade()
    store.register_policy_version("robot-test-v1", kind="scripted")
    return store


def _spool(tmp_path: Path, episodes: int) -> tuple[EpisodeSpool, list[EpisodeRecord]]:
    spool = EpisodeSpool(tmp_path / "robot.db")
    records = [make_record(seed=seed) for seed in range(episodes)]
    for record in records:
        spool.put(record)
    return spool, records


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _assert_exactly_once(store: ExperienceStore, spool: EpisodeSpool, records: list[EpisodeRecord]) -> None:
    stored = [summary.uuid for summary in store.list_episodes()]
    assert sorted(stored) == sorted(record.uuid for record in records)
    assert spool.pending() == []
    assert spool.counts()["sent"] == len(records)


def test_network_loss_retries_with_backoff_then_delivers_exactly_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    spool, records = _spool(tmp_path, 4)
    port = _free_port()
    config = UploadConfig(url=f"http://127.0.0.1:{port}", api_key=KEY, backoff_s=0.05, max_backoff_s=0.4)
    uploader = Uploader(spool, config)
    delays: list[float] = []
    uploader._sleep = lambda s: (delays.append(s), time.sleep(s))  # record the backoff schedule

    first = uploader.upload_pending()  # ingest down: bounded retries, then the pass gives up
    assert (
        first.remaining == 4
        and first.retries == config.max_attempts - 1
        and "network" in (first.gave_up or "")
    )
    assert delays[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4], rel=0.21) and max(delays) <= 0.4 * 1.2
    assert spool.entries()[0].attempts == config.max_attempts and "network" in spool.entries()[0].last_error

    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(report=uploader.upload_until_empty(30.0)))
    worker.start()
    time.sleep(0.8)  # still down for a while, then the ingest comes back on the same port
    with IngestServer(store, IngestConfig(api_key=KEY, port=port)):
        worker.join(timeout=60)
        assert result["report"].complete
    _assert_exactly_once(store, spool, records)


_UPLOADER = "from experiments.commands.robot import app; app()"


def test_sigkill_mid_upload_then_restart_delivers_exactly_once(tmp_path: Path) -> None:
    store = _store(tmp_path, SlowAckStore)
    spool, records = _spool(tmp_path, 6)
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as server:
        command = [sys.executable, "-c", _UPLOADER, "upload", "--spool", str(spool.path), "--url", server.url]
        env = {**os.environ, "FLYWHEEL_INGEST_KEY": KEY}
        uploader = subprocess.Popen(command, env=env, cwd=Path(__file__).parents[1])
        deadline = time.monotonic() + 60
        while len(store.list_episodes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(uploader.pid, signal.SIGKILL)  # the 2nd is committed, its acknowledgement still pending
        uploader.wait()
        sent_before = spool.counts()["sent"]
        assert sent_before < len(store.list_episodes()) <= 3

        SlowAckStore.ack_delay_s = 0.0
        config = UploadConfig(url=server.url, api_key=KEY)
        report = Uploader(spool, config).upload_pending()
    assert len(report.duplicates) >= 1  # committed before the kill, acknowledged now without a second copy
    assert len(report.stored) + len(report.duplicates) == len(records) - sent_before
    _assert_exactly_once(store, spool, records)


def test_refusals_are_recorded_and_auth_errors_raise(tmp_path: Path) -> None:
    store = _store(tmp_path)
    spool, _ = _spool(tmp_path, 1)
    unknown = make_record(seed=9, version="unregistered")
    spool.put(unknown)
    big = make_record(seed=10, steps=300)
    spool.put(big)
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as server:
        with pytest.raises(UploadAuthError, match=r"Api-Key"):
            Uploader(spool, UploadConfig(url=server.url, api_key="wrong")).upload_pending()
        assert spool.counts()["sent"] == 0
        config = UploadConfig(url=server.url, api_key=KEY, max_episode_bytes=32 * 1024)
        report = Uploader(spool, config).upload_pending()
    assert report.complete and len(report.stored) == 1
    assert "policy_version" in report.rejected[str(unknown.uuid)]
    assert "limit 32768" in report.rejected[str(big.uuid)]
    rejected = {entry.uuid: entry for entry in spool.entries(SpoolStatus.REJECTED)}
    assert set(rejected) == {unknown.uuid, big.uuid}
    assert len(store.list_episodes()) == 1
    store.register_policy_version("unregistered", kind="scripted")  # the platform is fixed: resend
    assert spool.requeue_rejected() == 2
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as server:
        report = Uploader(spool, UploadConfig(url=server.url, api_key=KEY)).upload_pending()
    assert sorted(report.stored) == sorted([str(unknown.uuid), str(big.uuid)])
    assert len(store.list_episodes()) == 3 and spool.counts()["rejected"] == 0


def _spool_raw(spool: EpisodeSpool, episode_uuid: str, payload: bytes) -> None:
    """Spool bytes as an older robot build did, without today's checks (put() would refuse them now)."""
    with sqlite3.connect(spool.path) as connection:
        connection.execute(
            "INSERT INTO spool (uuid, created_at, size_bytes, payload) VALUES (?, ?, ?, ?)",
            (episode_uuid, time.time(), len(payload), payload),
        )


def test_refused_episodes_are_set_aside_the_rest_is_delivered_and_upload_exits_1(
    store_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = ExperienceStore(store_url)
    store.upgrade()
    store.register_policy_version("robot-test-v1", kind="scripted")
    spool = EpisodeSpool(tmp_path / "robot.db")
    valid = [make_record(seed=seed) for seed in range(3)]
    wrong_state = make_record(seed=7)  # well-formed, but reach-v3 has a 7-D (or 4-D) state
    wrong_state.states = np.ascontiguousarray(wrong_state.states[:, :3])
    huge_seed = make_record(seed=8)
    body = msgpack.unpackb(encode_episode(huge_seed))
    body["seed"] = 2**64 - 1
    spool.put(valid[0])
    spool.put(wrong_state)
    spool.put(valid[1])
    _spool_raw(spool, str(huge_seed.uuid), msgpack.packb(body))
    spool.put(valid[2])
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as server:
        command = [sys.executable, "-m", "experiments.cli", "robot", "upload", "--spool", str(spool.path)]
        done = subprocess.run(
            [*command, "--url", server.url],
            env={**os.environ, "FLYWHEEL_INGEST_KEY": KEY},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "stored=3" in done.stdout and "pending=0" in done.stdout
    lines = {
        line.split()[1].rstrip(":"): line for line in done.stderr.splitlines() if line.startswith("rejected ")
    }
    assert set(lines) == {str(wrong_state.uuid), str(huge_seed.uuid)}
    assert "HTTP 422" in lines[str(wrong_state.uuid)] and "states" in lines[str(wrong_state.uuid)]
    assert "seed" in lines[str(huge_seed.uuid)] and "64-bit" in lines[str(huge_seed.uuid)]
    assert sorted(s.uuid for s in store.list_episodes()) == sorted(r.uuid for r in valid)
    rejected = {entry.uuid: entry for entry in spool.entries(SpoolStatus.REJECTED)}
    assert set(rejected) == {wrong_state.uuid, huge_seed.uuid}
    assert "states" in (rejected[wrong_state.uuid].last_error or "")  # the reason is kept with the episode
    assert spool.load(wrong_state.uuid).states.shape[1] == 3  # kept aside, nothing deleted
    assert spool.counts() == {"pending": 0, "sent": 3, "rejected": 2}


class PoisonStore(ExperienceStore):
    """A store whose database keeps failing (a retryable error) for some episodes."""

    poison: frozenset = frozenset()

    def write_episode(self, record: EpisodeRecord) -> bool:
        if record.uuid in self.poison:
            raise sa.exc.OperationalError("INSERT INTO episodes ...", {}, Exception("lock timeout"))
        return super().write_episode(record)


def test_an_episode_that_keeps_failing_never_blocks_the_ones_behind_it(tmp_path: Path) -> None:
    store = _store(tmp_path, PoisonStore)
    spool, records = _spool(tmp_path, 5)
    store.poison = frozenset({records[0].uuid, records[2].uuid, records[3].uuid})
    config = UploadConfig(url="", api_key=KEY, max_attempts=2, backoff_s=0.01, max_backoff_s=0.02)
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as server:
        uploader = Uploader(spool, config.model_copy(update={"url": server.url}))
        report = uploader.upload_pending()
        # the 1st fails (503, twice) and stays pending, the 2nd is stored, the 3rd and 4th fail in a row:
        # the platform, not the episode, is the problem, so the pass stops before the 5th
        assert report.stored == [str(records[1].uuid)] and report.remaining == 4
        assert "lock timeout" in (report.gave_up or "") and report.rejected == {}
        store.poison = frozenset({records[0].uuid})
        again = uploader.upload_pending()
    assert again.stored == [str(r.uuid) for r in records[2:]]
    assert [entry.uuid for entry in spool.pending()] == [records[0].uuid]
    assert spool.entries()[0].attempts == 4 and "503" in (spool.entries()[0].last_error or "")
