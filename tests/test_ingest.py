"""The authenticated ingest endpoint (SQLite and PostgreSQL stores): bad uploads are refused with a clear
error and nothing is written."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from experiments.ingest import IngestConfig, IngestServer
from storage.spool import encode_episode
from storage.store import ExperienceStore
from tests.storage_fixtures import pg_database, store_url  # noqa: F401 (fixtures: both store backends)
from tests.test_spool import make_record

KEY = "ingest-secret"


@pytest.fixture
def store(store_url: str) -> ExperienceStore:  # noqa: F811
    """An empty store on SQLite and on the PostgreSQL server, with the test policy version registered."""
    experience = ExperienceStore(store_url)
    experience.upgrade()
    experience.register_policy_version("robot-test-v1", kind="scripted")
    return experience


@pytest.fixture
def ingest(store: ExperienceStore) -> Iterator[IngestServer]:
    with IngestServer(store, IngestConfig(api_key=KEY, port=0, max_episode_bytes=64 * 1024)) as server:
        yield server


def post(server: IngestServer, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Authorization": f"Api-Key {key}"} if key is not None else {}
    request = urllib.request.Request(f"{server.url}/episodes", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_binds_loopback_and_needs_a_key() -> None:
    assert IngestConfig(api_key="k").host == "127.0.0.1"
    with pytest.raises(ValueError, match="api_key"):
        IngestConfig(api_key="")


def test_store_then_duplicate_then_conflict(ingest: IngestServer, store: ExperienceStore) -> None:
    record = make_record()
    assert post(ingest, encode_episode(record)) == (201, {"uuid": str(record.uuid), "status": "stored"})
    assert post(ingest, encode_episode(record)) == (200, {"uuid": str(record.uuid), "status": "duplicate"})
    conflicting = make_record(seed=5)
    conflicting.uuid = record.uuid
    status, reply = post(ingest, encode_episode(conflicting))
    assert status == 409 and "different content" in reply["error"]
    assert [s.uuid for s in store.list_episodes()] == [record.uuid]
    loaded = store.load_episode(record.uuid)
    np.testing.assert_array_equal(loaded.sources, record.sources)
    assert loaded.policy_versions == record.policy_versions


def _with(record_bytes: bytes, **changes: object) -> bytes:
    body = msgpack.unpackb(record_bytes)
    body.update(changes)
    return msgpack.packb(body)


@pytest.mark.parametrize(
    ("case", "status", "fragment"),
    [
        ("wrong key", 401, "Api-Key"),
        ("no key", 401, "Api-Key"),
        ("oversized", 413, "at most 65536 bytes"),
        ("not msgpack", 400, "msgpack"),
        ("object dtype", 400, "actions.dtype"),
        ("wrong shape", 422, "rewards"),
        ("unknown version", 422, "policy_version"),
    ],
)
def test_bad_uploads_are_refused_and_nothing_is_written(
    ingest: IngestServer, store: ExperienceStore, case: str, status: int, fragment: str
) -> None:
    good = encode_episode(make_record())
    key: str | None = KEY
    body = good
    if case == "wrong key":
        key = "ingest-secreT"
    elif case == "no key":
        key = None
    elif case == "oversized":
        body = encode_episode(make_record(steps=400))
        assert len(body) > 64 * 1024
    elif case == "not msgpack":
        body = b"\xc1\x00not an episode"
    elif case == "object dtype":
        body = _with(good, actions={"dtype": "|O", "shape": [1], "data": b"\x00" * 8})
    elif case == "wrong shape":
        body = _with(good, rewards={"dtype": "<f4", "shape": [2], "data": b"\x00" * 8})
    elif case == "unknown version":
        body = encode_episode(make_record(version="never-registered"))
    got_status, reply = post(ingest, body, key)
    assert got_status == status
    assert fragment in reply["error"]
    assert "\n" not in reply["error"]
    assert store.list_episodes() == []
    assert post(ingest, good)[0] == 201  # the endpoint keeps serving after a refusal


def test_register_unknown_versions_when_allowed(store: ExperienceStore) -> None:
    config = IngestConfig(api_key=KEY, port=0, register_unknown_versions=True)
    with IngestServer(store, config) as server:
        record = make_record(version="robot-reported-v9")
        assert post(server, encode_episode(record))[0] == 201
    assert store.list_episodes(policy_version="robot-reported-v9")[0].uuid == record.uuid


class FlakyStore(ExperienceStore):
    """A store whose database is unreachable for the first write."""

    failures = 1

    def write_episode(self, record):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database at 10.0.0.5:5432 is unreachable")
        return super().write_episode(record)


def test_store_failure_is_a_retryable_503(tmp_path: Path) -> None:
    store = FlakyStore(f"sqlite:///{tmp_path / 'flaky.db'}")
    store.upgrade()
    store.register_policy_version("robot-test-v1", kind="scripted")
    record = make_record()
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as server:
        status, reply = post(server, encode_episode(record))
        assert status == 503 and "unreachable" in reply["error"]
        assert store.list_episodes() == []
        assert post(server, encode_episode(record))[0] == 201
