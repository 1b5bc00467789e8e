"""The upload client: exactly-once delivery across ingest outages, a SIGKILLed uploader, and refusals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments.ingest import IngestConfig, IngestServer
from experiments.upload import UploadAuthError, UploadConfig, Uploader
from storage.records import EpisodeRecord
from storage.spool import EpisodeSpool, SpoolStatus
from storage.store import ExperienceStore
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
