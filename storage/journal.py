"""A rollout worker's crash-safe journal of unfinished episodes, so a worker killed mid-episode can record it.

One SQLite file (WAL) per worker holds the latest snapshot of each open episode, written at every chunk
boundary in the same bytes as the robot spool (``storage.spool.encode_episode``). A committed transaction
survives the death of the writing process (SIGKILL included; ``synchronous=NORMAL`` does not promise to survive a
power loss). When the worker is rebuilt after a crash, it commits every snapshot left in its journal as an
``error`` episode and clears the journal.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

from storage.records import EpisodeRecord
from storage.spool import decode_episode, encode_episode

_SCHEMA = "CREATE TABLE IF NOT EXISTS open_episodes (uuid TEXT PRIMARY KEY, payload BLOB NOT NULL)"


class EpisodeJournal:
    """Snapshots of a worker's open episodes in a SQLite file; each statement is its own transaction.

    The connection is opened once (in the process that builds the journal) and serialized by a lock, since a
    Ray actor may call into its worker from more than one thread.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.execute(_SCHEMA)

    def save(self, record: EpisodeRecord) -> None:
        """Replace the snapshot of ``record``'s episode with ``record`` (atomically)."""
        payload = encode_episode(record)
        self._execute(
            "INSERT OR REPLACE INTO open_episodes (uuid, payload) VALUES (?, ?)", str(record.uuid), payload
        )

    def drop(self, episode_uuid: uuid.UUID) -> None:
        """Forget an episode (it was committed whole, or abandoned on purpose)."""
        self._execute("DELETE FROM open_episodes WHERE uuid = ?", str(episode_uuid))

    def open_episodes(self) -> list[EpisodeRecord]:
        """Every snapshot still in the journal, decoded and validated."""
        rows = self._execute("SELECT payload FROM open_episodes ORDER BY uuid")
        return [decode_episode(bytes(row[0])) for row in rows]

    def close(self) -> None:
        """Close the connection (the file and its snapshots stay)."""
        with self._lock:
            self._connection.close()

    def _execute(self, statement: str, *params: object) -> list[tuple]:
        with self._lock:
            return self._connection.execute(statement, params).fetchall()
