"""The authenticated ingest endpoint (SQLite and PostgreSQL stores): bad uploads are refused with a clear
error naming the field and nothing is written; slow and abusive clients are bounded."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import sqlalchemy as sa

from experiments.ingest import IngestConfig, IngestServer, metaworld_task_specs
from storage.errors import StoreUnavailableError
from storage.records import TaskSpec
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


def post(server: IngestServer, body: bytes, key: str | None = KEY, timeout: float = 10) -> tuple[int, dict]:
    headers = {"Authorization": f"Api-Key {key}"} if key is not None else {}
    request = urllib.request.Request(f"{server.url}/episodes", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
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


def _deep_metadata(record_bytes: bytes, levels: int) -> bytes:
    """The episode with metadata nested ``levels`` maps deep (msgpack's packer refuses to build it)."""
    marker = "__deep__"
    packed = _with(record_bytes, metadata=marker)
    assert packed.count(msgpack.packb(marker)) == 1
    return packed.replace(msgpack.packb(marker), b"\x81\xa1a" * levels + b"\x80")


def _reach_with_state_dim(dim: int) -> bytes:
    record = make_record()
    record.states = np.ascontiguousarray(record.states[:, :dim])
    return encode_episode(record)  # a well-formed episode: only reach-v3's spec refuses it


#: A tagged (msgpack-numpy) array map, as the episode bytes carry arrays.
_ARRAY_MAP = {b"__ndarray__": True, b"dtype": "<f4", b"shape": [1], b"data": b"\x00" * 4}


def _bad_body(case: str, good: bytes) -> bytes:
    frames = msgpack.unpackb(good)["images"]["corner2"]
    bodies = {
        "oversized": lambda: encode_episode(make_record(steps=400)),
        "not msgpack": lambda: b"\xc1\x00not an episode",
        "object dtype": lambda: _with(good, actions={**_ARRAY_MAP, b"dtype": "|O", b"data": b"\x00" * 8}),
        "wrong shape": lambda: _with(good, rewards={**_ARRAY_MAP, b"shape": [2], b"data": b"\x00" * 8}),
        "unknown version": lambda: encode_episode(make_record(version="never-registered")),
        "seed 2^64-1": lambda: _with(good, seed=2**64 - 1),
        "300-char task": lambda: _with(good, task="t" * 300),
        "NUL in task": lambda: _with(good, task="reach\x00-v3"),
        "NUL in metadata": lambda: _with(good, metadata={"operator": "ann\x00"}),
        "long camera name": lambda: _with(good, images={"c" * 65: frames}),
        "long trigger": lambda: _with(good, interventions=[[4, 7, "t" * 129]]),
        "metadata 1000 deep": lambda: _deep_metadata(good, 1000),
        "reach-v3 3-D state": lambda: _reach_with_state_dim(3),
        "camera not in task": lambda: _with(good, images={"wrist": frames}),
    }
    return bodies[case]() if case in bodies else good


@pytest.mark.parametrize(
    ("case", "status", "field", "fragment"),
    [
        ("wrong key", 401, "Authorization", "Api-Key"),
        ("no key", 401, "Authorization", "Api-Key"),
        ("oversized", 413, "body", "at most 65536 bytes"),
        ("not msgpack", 400, "body", "msgpack"),
        ("object dtype", 400, "actions.dtype", "actions.dtype"),
        ("wrong shape", 422, "rewards", "rewards"),
        ("unknown version", 422, "policy_version", "policy_version"),
        ("seed 2^64-1", 422, "seed", "signed 64-bit integer"),
        ("300-char task", 422, "task", "at most 256 characters"),
        ("NUL in task", 422, "task", "NUL"),
        ("NUL in metadata", 422, "metadata", "NUL"),
        ("long camera name", 422, "images camera name", "at most 64 characters"),
        ("long trigger", 422, "interventions[0].trigger", "at most 128 characters"),
        ("metadata 1000 deep", 422, "metadata", "nested at most 64 levels"),
        ("reach-v3 3-D state", 422, "states", "state size 4 or 7 or 10 or 39 for task 'reach-v3'"),
        ("camera not in task", 422, "images camera name", "for task 'reach-v3'"),
    ],
)
def test_bad_uploads_are_refused_with_the_field_and_nothing_is_written(
    ingest: IngestServer, store: ExperienceStore, case: str, status: int, field: str, fragment: str
) -> None:
    good = encode_episode(make_record())
    key = {"wrong key": "ingest-secreT", "no key": None}.get(case, KEY)
    got_status, reply = post(ingest, _bad_body(case, good), key)
    assert (got_status, reply.get("field")) == (status, field), reply
    assert fragment in reply["error"]
    assert "\n" not in reply["error"]
    assert store.list_episodes() == []
    assert post(ingest, good)[0] == 201  # the endpoint keeps serving after a refusal


def test_task_specs_check_known_tasks_and_accept_unknown_ones(store: ExperienceStore) -> None:
    other = make_record(seed=1)
    other.task, other.states = "ur5-stack-cups", np.ascontiguousarray(other.states[:, :3])
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as server:
        assert post(server, encode_episode(other))[0] == 201  # no spec for this task: accepted
    spec = TaskSpec(state_dims=frozenset({6}), cameras=frozenset({"corner2"}))
    another = make_record(seed=2)
    another.task, another.states = other.task, other.states.copy()
    config = IngestConfig(api_key=KEY, port=0, task_specs={other.task: spec})
    with IngestServer(store, config) as server:
        status, reply = post(server, encode_episode(another))
    assert status == 422 and reply["field"] == "states" and "state size 6" in reply["error"]
    assert [s.uuid for s in store.list_episodes()] == [other.uuid]


def test_metaworld_specs_match_the_real_env() -> None:
    from envs import EnvConfig, MetaWorldEnv
    from envs.rendering import camera_names

    env = MetaWorldEnv(EnvConfig(task="reach-v3", render=False))
    try:
        spec = metaworld_task_specs()["reach-v3"]
        assert env.observation_space["state"].shape[0] in (spec.state_dims or ())
        assert env.action_space.shape == (spec.action_dim,)
        assert env.observation_space["privileged"].shape == (spec.privileged_dim,)
        assert set(camera_names(env._sim.model)) == spec.cameras
    finally:
        env.close()


def test_register_unknown_versions_when_allowed(store: ExperienceStore) -> None:
    config = IngestConfig(api_key=KEY, port=0, register_unknown_versions=True)
    with IngestServer(store, config) as server:
        record = make_record(version="robot-reported-v9")
        assert post(server, encode_episode(record))[0] == 201
    assert store.list_episodes(policy_version="robot-reported-v9")[0].uuid == record.uuid


class FlakyStore(ExperienceStore):
    """A store whose database fails the first write with ``error`` (unreachable by default)."""

    error: Exception = ConnectionError("database at 10.0.0.5:5432 is unreachable")
    failures = 1

    def write_episode(self, record):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise self.error
        return super().write_episode(record)


def _db_error(kind: type[sa.exc.DBAPIError], message: str) -> sa.exc.DBAPIError:
    return kind("INSERT INTO episodes ...", {}, Exception(message))


@pytest.mark.parametrize(
    ("error", "status", "fragment"),
    [
        (ConnectionError("database at 10.0.0.5:5432 is unreachable"), 503, "unreachable"),
        (_db_error(sa.exc.OperationalError, "lock timeout"), 503, "lock timeout"),
        (
            StoreUnavailableError("store postgresql+psycopg://db:5432/x: cannot connect (refused)"),
            503,
            "refused",
        ),
        (_db_error(sa.exc.DataError, "value too long for type character varying(64)"), 422, "too long"),
        (RuntimeError("a bug"), 500, "a bug"),
    ],
)
def test_store_failures_are_503_only_when_a_retry_can_fix_them(
    tmp_path: Path, error: Exception, status: int, fragment: str
) -> None:
    store = FlakyStore(f"sqlite:///{tmp_path / 'flaky.db'}")
    store.error = error
    store.upgrade()
    store.register_policy_version("robot-test-v1", kind="scripted")
    record = make_record()
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as server:
        got, reply = post(server, encode_episode(record))
        assert got == status and fragment in reply["error"] and "\n" not in reply["error"]
        assert store.list_episodes() == []
        assert post(server, encode_episode(record))[0] == 201


# ---- slow and abusive clients ------------------------------------------------------------------------------


def _start_upload(server: IngestServer, declared: int, sent: bytes) -> socket.socket:
    """An authenticated upload that declares ``declared`` body bytes, sends ``sent`` and then stalls."""
    client = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        f"POST /episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Api-Key {KEY}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    client.sendall(head.encode() + sent)
    return client


def _read_until_closed(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket timeout bounds the wait)."""
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


def _health(server: IngestServer) -> int:
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=30) as response:
        return response.status


def _wait_for(condition, timeout_s: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_stalled_bodies_are_dropped_and_uploads_and_connections_are_capped(store: ExperienceStore) -> None:
    config = IngestConfig(
        api_key=KEY, port=0, stall_timeout_s=1.0, max_concurrent_uploads=2, max_connections=6
    )
    good = encode_episode(make_record())
    with IngestServer(store, config) as server:
        stalled = [_start_upload(server, 10 * len(good), good[:1000]) for _ in range(2)]
        assert _wait_for(lambda: server.connections == 2)
        busy, reply = post(server, good)  # both upload slots are held by the stalled bodies
        assert busy == 503 and "busy" in reply["error"]
        assert _health(server) == 200
        for client in stalled:  # dropped once they have been silent for stall_timeout_s
            assert _read_until_closed(client).startswith(b"HTTP/1.1 408")
            client.close()
        assert _wait_for(lambda: server.connections == 0)
        assert post(server, good)[0] == 201

        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(6)]
        assert _wait_for(lambda: server.connections == 6)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        assert _read_until_closed(extra).startswith(b"HTTP/1.1 503")  # over max_connections
        extra.close()
        for client in idle:  # silent connections are closed after stall_timeout_s as well
            assert _read_until_closed(client) == b""
            client.close()
        assert _wait_for(lambda: server.connections == 0)
        assert _health(server) == 200
    assert len(store.list_episodes()) == 1


def test_healthz_answers_during_a_large_upload(store: ExperienceStore) -> None:
    record = make_record(steps=150)
    frames = np.zeros((150, 240, 320, 3), np.uint8)
    frames[:, :8, :8] = np.arange(150, dtype=np.uint8)[:, None, None, None]  # 150 distinct frames
    record.images = {"corner2": frames}
    body = encode_episode(record)
    assert len(body) > 30 * 1024 * 1024
    config = IngestConfig(api_key=KEY, port=0, max_episode_bytes=64 * 1024 * 1024)
    with IngestServer(store, config) as server:
        result: dict[str, tuple[int, dict]] = {}
        upload = threading.Thread(target=lambda: result.update(reply=post(server, body, timeout=120)))
        upload.start()
        answered_during_upload = 0
        while upload.is_alive():
            assert _health(server) == 200  # within the generous 30 s timeout of _health
            answered_during_upload += upload.is_alive()
        upload.join()
    assert result["reply"][0] == 201
    assert answered_during_upload > 0
    assert store.load_episode(record.uuid).images["corner2"].shape == frames.shape
