"""The robot's crash-safe local spool: finished episodes wait here (SQLite, WAL) until the platform has them.

A robot records an episode, ``put``s it (one transaction: it is either fully in the spool or not at all), and an
uploader later sends each pending episode and calls ``mark_sent`` only after the ingest endpoint acknowledged
it. A process killed at any point (SIGKILL, power loss) leaves the spool consistent; on restart the uploader
resends what is still pending, and the ingest side's idempotency by UUID turns a resend of an episode that was
committed but not acknowledged into a duplicate acknowledgement, so every episode arrives exactly once.

Episodes travel and rest in the same bytes: ``encode_episode`` / ``decode_episode``, a msgpack map whose
arrays are the policy wire's tagged array maps (:mod:`core.msgpack_numpy`, the one codec). Only bool,
integer and float dtypes are accepted (never object arrays, never pickle), and decoding checks every field's
type before ``EpisodeRecord.validate`` checks shapes. Bytes of the first format (arrays as untagged
``{"dtype", "shape", "data"}`` maps, in older spools and journals) decode through the same array check.
"""

from __future__ import annotations

import dataclasses
import enum
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from core import msgpack_numpy
from core.types import Observation
from storage import codec
from storage.records import (
    ARRAY_FIELDS,
    IN_MEMORY_FIELDS,
    EpisodeRecord,
    EpisodeValidationError,
    InterventionSegment,
    Outcome,
)

EPISODE_FORMAT = "flywheel.episode/2"
_FORMAT_UNTAGGED = "flywheel.episode/1"
_TAGGED_PARTS = (b"dtype", b"shape", b"data")
_UNTAGGED_PARTS = ("dtype", "shape", "data")
_ALLOWED_KINDS = "biuf"
#: Fields added after the format's first release: bytes spooled before them decode with None.
_LATER_FIELDS = frozenset({"reference_chunks", "final_observation"})


class EpisodeDecodeError(EpisodeValidationError):
    """Bytes that are not a valid encoded episode (the message names the field and what was expected)."""


class SpoolStatus(enum.StrEnum):
    """Where a spooled episode stands: waiting, acknowledged by the platform, or refused for good."""

    PENDING = "pending"
    SENT = "sent"
    REJECTED = "rejected"


# ---- episode bytes ---------------------------------------------------------------------------------------


def encode_episode(record: EpisodeRecord) -> bytes:
    """The episode as msgpack bytes (validated first, so only well-formed episodes are ever encoded)."""
    record.validate()
    body: dict[str, Any] = {
        "format": EPISODE_FORMAT,
        "uuid": str(record.uuid),
        "task": record.task,
        "env_id": record.env_id,
        "policy_version": record.policy_version,
        "seed": record.seed,
        "outcome": Outcome(record.outcome).value,
        "policy_versions": list(record.policy_versions),
        "images": {camera: _checked(frames) for camera, frames in record.images.items()},
        "privileged": None if record.privileged is None else _checked(record.privileged),
        "interventions": [[s.t_start, s.t_end, s.trigger] for s in record.interventions],
        "metadata": record.metadata,
        "run_id": record.run_id,
        "error": record.error,
        "subtasks": record.subtasks,
        "prompt": record.prompt,
        "injected": record.injected,
        "reference_chunks": None if record.reference_chunks is None else _checked(record.reference_chunks),
        "final_observation": (
            None if record.final_observation is None else codec.encode_observation(record.final_observation)
        ),
    }
    for name in ARRAY_FIELDS:
        body[name] = _checked(getattr(record, name))
    return msgpack_numpy.packb(body)


def decode_episode(data: bytes) -> EpisodeRecord:
    """Parse and validate encoded episode bytes; raise ``EpisodeDecodeError`` / ``EpisodeValidationError``."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise EpisodeDecodeError("body", "msgpack bytes", f"{type(error).__name__}: {error}") from None
    if not isinstance(body, dict):
        raise EpisodeDecodeError("body", "a msgpack map", type(body).__name__)
    if body.get("format") not in (EPISODE_FORMAT, _FORMAT_UNTAGGED):
        raise EpisodeDecodeError("format", repr(EPISODE_FORMAT), repr(body.get("format")))
    tagged = body["format"] == EPISODE_FORMAT
    expected = ({f.name for f in dataclasses.fields(EpisodeRecord)} - IN_MEMORY_FIELDS) | {"format"}
    unknown = sorted(set(body) - expected)
    if unknown:
        raise EpisodeDecodeError("body", f"only the fields {sorted(expected)}", f"unknown {unknown}")
    missing = sorted(expected - set(body) - _LATER_FIELDS)
    if missing:
        raise EpisodeDecodeError("body", "every EpisodeRecord field", f"missing {missing}")
    record = EpisodeRecord(
        uuid=_parse_uuid(body["uuid"]),
        task=body["task"],
        env_id=body["env_id"],
        policy_version=body["policy_version"],
        seed=body["seed"],
        outcome=_parse_outcome(body["outcome"]),
        policy_versions=body["policy_versions"],
        images=_unpack_images(body["images"], tagged),
        privileged=(
            None if body["privileged"] is None else _unpack_array("privileged", body["privileged"], tagged)
        ),
        interventions=_parse_interventions(body["interventions"]),
        metadata=body["metadata"],
        run_id=body["run_id"],
        error=body["error"],
        subtasks=body["subtasks"],
        prompt=body["prompt"],
        injected=body["injected"],
        reference_chunks=(
            None
            if body.get("reference_chunks") is None
            else _unpack_array("reference_chunks", body["reference_chunks"], tagged)
        ),
        final_observation=_unpack_observation(body.get("final_observation")),
        **{name: _unpack_array(name, body[name], tagged) for name in ARRAY_FIELDS},
    )
    record.validate()
    return record


def _checked(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in _ALLOWED_KINDS:
        raise EpisodeValidationError("array", "a bool/int/float numpy array", f"dtype {array.dtype}")
    return array


def _unpack_array(name: str, packed: Any, tagged: bool) -> np.ndarray:
    """A writable copy of the array ``packed`` holds (a tagged map; an untagged one in the first format)."""
    if tagged and not msgpack_numpy.is_array_map(packed):
        raise EpisodeDecodeError(name, "a tagged array map (core.msgpack_numpy)", repr(packed)[:60])
    if not tagged and (not isinstance(packed, dict) or set(packed) != set(_UNTAGGED_PARTS)):
        raise EpisodeDecodeError(name, "an array map {dtype, shape, data}", repr(packed)[:60])
    dtype, shape, data = (packed[part] for part in (_TAGGED_PARTS if tagged else _UNTAGGED_PARTS))
    try:
        array = msgpack_numpy.array_from_parts(dtype, shape, data)
    except msgpack_numpy.WireFormatError as error:
        raise EpisodeDecodeError(f"{name}.{error.part}", "a valid array map", str(error)) from None
    if array.dtype.kind not in _ALLOWED_KINDS:
        raise EpisodeDecodeError(f"{name}.dtype", "a bool/int/float dtype", repr(dtype))
    return array.copy()


def _unpack_observation(data: Any) -> Observation | None:
    """The final observation's bytes (``storage.codec.encode_observation``) decoded, or None."""
    if data is None:
        return None
    if not isinstance(data, bytes):
        raise EpisodeDecodeError("final_observation", "observation bytes or None", type(data).__name__)
    try:
        return codec.decode_observation(data)
    except ValueError as error:  # WireFormatError is one
        raise EpisodeDecodeError("final_observation", "an encoded observation", str(error)[:80]) from None


def _unpack_images(images: Any, tagged: bool) -> dict[str, np.ndarray]:
    if not isinstance(images, dict):
        raise EpisodeDecodeError("images", "a map camera -> array", type(images).__name__)
    return {camera: _unpack_array(f"images[{camera!r}]", frames, tagged) for camera, frames in images.items()}


def _parse_uuid(value: Any) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        raise EpisodeDecodeError("uuid", "a UUID string", repr(value)[:60]) from None


def _parse_outcome(value: Any) -> Outcome:
    try:
        return Outcome(value)
    except ValueError:
        raise EpisodeDecodeError("outcome", "/".join(o.value for o in Outcome), repr(value)) from None


def _parse_interventions(value: Any) -> list[InterventionSegment]:
    if not isinstance(value, list):
        raise EpisodeDecodeError("interventions", "a list of [t_start, t_end, trigger]", type(value).__name__)
    segments = []
    for index, item in enumerate(value):
        if not (isinstance(item, list) and len(item) == 3 and all(isinstance(v, int) for v in item[:2])):
            raise EpisodeDecodeError(f"interventions[{index}]", "[t_start, t_end, trigger]", repr(item)[:60])
        segments.append(InterventionSegment(item[0], item[1], item[2]))
    return segments


# ---- the spool -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled episode's bookkeeping (not its bytes)."""

    uuid: uuid.UUID
    status: SpoolStatus
    size_bytes: int
    created_at: float
    attempts: int
    last_error: str | None
    sent_at: float | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    uuid TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    size_bytes INTEGER NOT NULL,
    payload BLOB NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS spool_status ON spool (status, created_at);
"""


class EpisodeSpool:
    """A SQLite file (WAL, ``synchronous=FULL``) of finished episodes and their upload status.

    Every method opens its own short transaction, so one spool file can be shared by the robot process (which
    ``put``s) and an uploader process (which reads pending episodes and marks them sent).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            yield connection
        finally:
            connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def put(self, record: EpisodeRecord) -> bool:
        """Spool an episode atomically; False if the identical episode is already spooled.

        Raises ``EpisodeValidationError`` for a malformed record and ``ValueError`` for the same UUID with
        different content; nothing is written in either case.
        """
        payload = encode_episode(record)
        with self._transaction() as connection:
            row = connection.execute(
                "SELECT payload FROM spool WHERE uuid = ?", (str(record.uuid),)
            ).fetchone()
            if row is not None:
                if bytes(row[0]) != payload:
                    raise ValueError(f"episode {record.uuid}: already spooled with different content")
                return False
            connection.execute(
                "INSERT INTO spool (uuid, created_at, size_bytes, payload) VALUES (?, ?, ?, ?)",
                (str(record.uuid), time.time(), len(payload), payload),
            )
        return True

    def entries(self, status: SpoolStatus | None = None) -> list[SpoolEntry]:
        """Spooled episodes, oldest first (all, or those with ``status``)."""
        query = "SELECT uuid, status, size_bytes, created_at, attempts, last_error, sent_at FROM spool"
        params: tuple[str, ...] = ()
        if status is not None:
            query, params = query + " WHERE status = ?", (SpoolStatus(status).value,)
        with self._connect() as connection:
            rows = connection.execute(query + " ORDER BY created_at, uuid", params).fetchall()
        return [SpoolEntry(uuid.UUID(r[0]), SpoolStatus(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows]

    def pending(self) -> list[SpoolEntry]:
        """Episodes not yet acknowledged by the platform (and not refused), oldest first."""
        return self.entries(SpoolStatus.PENDING)

    def payload(self, episode_uuid: uuid.UUID) -> bytes:
        """The encoded episode (``KeyError`` if it is not spooled)."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT payload FROM spool WHERE uuid = ?", (str(episode_uuid),)
            ).fetchone()
        if row is None:
            raise KeyError(f"episode {episode_uuid}: not in the spool at {self.path}")
        return bytes(row[0])

    def load(self, episode_uuid: uuid.UUID) -> EpisodeRecord:
        """The spooled episode, decoded and validated."""
        return decode_episode(self.payload(episode_uuid))

    def mark_sent(self, episode_uuid: uuid.UUID) -> None:
        """Record the platform's acknowledgement (call only after the ingest endpoint answered 2xx)."""
        self._set_status(episode_uuid, SpoolStatus.SENT, None)

    def mark_rejected(self, episode_uuid: uuid.UUID, error: str) -> None:
        """Record a permanent refusal (bad episode, too big, conflict): it is kept but no longer retried."""
        self._set_status(episode_uuid, SpoolStatus.REJECTED, error)

    def requeue_rejected(self) -> int:
        """Make every rejected episode pending again (after the platform was fixed); returns how many."""
        with self._transaction() as connection:
            cursor = connection.execute(
                "UPDATE spool SET status = ?, attempts = 0 WHERE status = ?",
                (SpoolStatus.PENDING.value, SpoolStatus.REJECTED.value),
            )
        return cursor.rowcount

    def record_attempt(self, episode_uuid: uuid.UUID, error: str | None) -> None:
        """Count one upload attempt and remember its error (``None`` on success)."""
        with self._transaction() as connection:
            connection.execute(
                "UPDATE spool SET attempts = attempts + 1, last_error = ? WHERE uuid = ?",
                (error, str(episode_uuid)),
            )

    def counts(self) -> dict[str, int]:
        """Number of episodes per status (every status present, 0 if none)."""
        with self._connect() as connection:
            rows = dict(connection.execute("SELECT status, COUNT(*) FROM spool GROUP BY status").fetchall())
        return {status.value: int(rows.get(status.value, 0)) for status in SpoolStatus}

    def _set_status(self, episode_uuid: uuid.UUID, status: SpoolStatus, error: str | None) -> None:
        sent_at = time.time() if status == SpoolStatus.SENT else None
        with self._transaction() as connection:
            cursor = connection.execute(
                "UPDATE spool SET status = ?, last_error = COALESCE(?, last_error), sent_at = ? WHERE uuid = ?",
                (status.value, error, sent_at, str(episode_uuid)),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"episode {episode_uuid}: not in the spool at {self.path}")
