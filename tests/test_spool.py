"""The robot's SQLite spool and the episode wire format: round trips, refusals, atomicity under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest

from actors.recorder import EpisodeRecorder
from core import msgpack_numpy
from storage.records import EpisodeRecord, EpisodeValidationError, Outcome, StepSource, StoreLimitError
from storage.spool import EpisodeDecodeError, EpisodeSpool, SpoolStatus, decode_episode, encode_episode


def make_record(
    steps: int = 12, version: str = "robot-test-v1", seed: int = 0, images: bool = True
) -> EpisodeRecord:
    """A small episode with a chunk, policy and human steps and (optionally) an 8×8 camera."""
    rng = np.random.default_rng(seed)
    recorder = EpisodeRecorder("reach-v3", "sim-robot:reach-v3", seed, record_images=images)
    chunk = recorder.add_chunk(rng.normal(size=(4, 4)).astype(np.float32))
    for t in range(steps):
        observation = {
            "images": {"corner2": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)},
            "state": rng.normal(size=7).astype(np.float32),
            "prompt": "reach",
        }
        human = 4 <= t < 7
        recorder.add_step(
            observation,
            rng.uniform(-1, 1, size=4),
            0.1,
            False,
            t == steps - 1,
            source=StepSource.HUMAN if human else StepSource.POLICY,
            policy_version=None if human else version,
            chunk_id=-1 if human else chunk,
            chunk_offset=-1 if human else t % 4,
            latency_ms=0.0 if human else 5.0,
        )
    recorder.metadata = {"timing": {"tick_late_ms": [0.1] * steps}}
    return recorder.finish(Outcome.TRUNCATED)


def test_round_trip_is_exact() -> None:
    record = make_record()
    decoded = decode_episode(encode_episode(record))
    assert decoded.uuid == record.uuid and decoded.policy_versions == record.policy_versions
    for name in ("states", "actions", "sources", "chunk_ids", "chunk_offsets", "latency_ms", "chunks"):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(record, name))
        assert getattr(decoded, name).dtype == getattr(record, name).dtype
    np.testing.assert_array_equal(decoded.images["corner2"], record.images["corner2"])
    assert decoded.metadata == record.metadata
    assert encode_episode(decoded) == encode_episode(record)


def test_episode_bytes_are_the_wire_codec_and_the_first_format_still_decodes() -> None:
    """One codec: the episode's arrays are msgpack-numpy maps any openpi client decodes; bytes written before
    (untagged ``{dtype, shape, data}`` maps, format 1) still decode to the same episode."""
    record = make_record()
    wire = msgpack_numpy.unpackb(encode_episode(record))
    np.testing.assert_array_equal(wire["actions"], record.actions)
    np.testing.assert_array_equal(wire["images"]["corner2"], record.images["corner2"])
    untagged = {
        key: {"dtype": value.dtype.str, "shape": list(value.shape), "data": value.tobytes()}
        if isinstance(value, np.ndarray)
        else value
        for key, value in wire.items()
    }
    untagged["images"] = {
        camera: {"dtype": frames.dtype.str, "shape": list(frames.shape), "data": frames.tobytes()}
        for camera, frames in wire["images"].items()
    }
    untagged["format"] = "flywheel.episode/1"
    decoded = decode_episode(msgpack.packb(untagged))
    assert encode_episode(decoded) == encode_episode(record)
    untagged["actions"]["dtype"] = "|O"
    with pytest.raises(EpisodeDecodeError, match=r"actions\.dtype"):
        decode_episode(msgpack.packb(untagged))


def _body(record: EpisodeRecord) -> dict:
    return msgpack.unpackb(encode_episode(record))


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda b: b.update(actions={**b["actions"], b"dtype": "|O"}), "actions.dtype"),
        (lambda b: b.update(actions={**b["actions"], b"dtype": "<U1"}), "actions.dtype"),
        (lambda b: b.update(states={**b["states"], b"data": b["states"][b"data"][:-4]}), "states.data"),
        (lambda b: b.update(states={**b["states"], b"shape": [-1]}), "states.shape"),
        (lambda b: b.update(states={"dtype": "<f4", "shape": [0], "data": b""}), "states: expected a tagged"),
        (lambda b: b.pop("rewards"), "missing ['rewards']"),
        (lambda b: b.update(extra=1), "unknown ['extra']"),
        (lambda b: b.update(uuid="not-a-uuid"), "uuid"),
        (lambda b: b.update(format="pickle"), "format"),
    ],
)
def test_malformed_bytes_name_the_field(mutate, fragment: str) -> None:
    body = _body(make_record())
    mutate(body)
    with pytest.raises(EpisodeDecodeError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        decode_episode(msgpack.packb(body))


def test_wrong_shapes_are_validation_errors() -> None:
    body = _body(make_record())
    body["rewards"] = np.zeros(3, np.float32)
    with pytest.raises(EpisodeValidationError, match="rewards"):
        decode_episode(msgpack_numpy.packb(body))
    with pytest.raises(EpisodeDecodeError, match="msgpack"):
        decode_episode(b"\xc1garbage")


def test_put_refuses_what_the_store_would_refuse(tmp_path: Path) -> None:
    """The robot runs the store's validation: an episode it spools is one the platform can store."""
    spool = EpisodeSpool(tmp_path / "robot.db")
    record = make_record()
    record.seed = 2**64 - 1
    with pytest.raises(StoreLimitError, match="seed: expected a signed 64-bit integer"):
        spool.put(record)
    record.seed, record.metadata = 0, {"operator": "ann\x00"}
    with pytest.raises(StoreLimitError, match="metadata: expected text without NUL bytes"):
        spool.put(record)
    assert spool.entries() == []


def test_put_is_atomic_idempotent_and_refuses_conflicts(tmp_path: Path) -> None:
    spool = EpisodeSpool(tmp_path / "spool.db")
    record = make_record()
    assert spool.put(record) is True
    assert spool.put(record) is False
    conflicting = make_record(seed=1)
    conflicting.uuid = record.uuid
    with pytest.raises(ValueError, match="different content"):
        spool.put(conflicting)
    bad = make_record(seed=2)
    bad.rewards = bad.rewards[:-1]
    with pytest.raises(EpisodeValidationError, match="rewards"):
        spool.put(bad)
    assert spool.counts() == {"pending": 1, "sent": 0, "rejected": 0}
    assert spool.load(record.uuid).uuid == record.uuid
    spool.mark_sent(record.uuid)
    assert spool.pending() == [] and spool.entries(SpoolStatus.SENT)[0].sent_at is not None
    with pytest.raises(KeyError):
        spool.mark_sent(uuid.uuid4())


_WRITER = """
import sys
from tests.test_spool import make_record
from storage.spool import EpisodeSpool
spool = EpisodeSpool(sys.argv[1])
for seed in range(10_000):
    spool.put(make_record(steps=40, seed=seed))
    print(seed, flush=True)
"""


def test_sigkill_while_writing_leaves_only_whole_episodes(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1]
    )
    assert writer.stdout is not None
    for _ in range(5):
        writer.stdout.readline()  # at least 5 committed episodes, then kill mid-stream
    time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    spool = EpisodeSpool(path)
    entries = spool.entries()
    assert len(entries) >= 5
    for entry in entries:
        assert spool.load(entry.uuid).length == 40  # every committed episode decodes and validates
