"""Relabel versions: per-step value / advantage / indicator labels, never overwritten, with lineage.

Each write creates a new id with version = the method's previous version + 1; labels go in bulk like steps and
are read straight through the driver.
"""

from __future__ import annotations

import itertools
import uuid

import numpy as np
import sqlalchemy as sa

from storage.database import Database, as_utc, batches
from storage.errors import NotFoundError, StoreError
from storage.reads import transpose
from storage.records import EpisodeLabels, RelabelRecord
from storage.schema import Episode, Relabel, RelabelValue

RELABEL_LOCK = 742002
VALUES_OF_RELABEL = (
    "SELECT episode_id, value, advantage, indicator FROM relabel_values WHERE relabel_id = ? "
    "ORDER BY episode_id, t"
)


class RelabelRepository:
    """Writes and reads the ``relabels`` and ``relabel_values`` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write(self, record: RelabelRecord) -> str:
        """Store a new relabel version and return its id (see ``ExperienceStore.write_relabel``)."""
        record.validate()
        relabel_id = record.relabel_id or uuid.uuid4().hex
        with self._db.write_engine.begin() as connection:
            self._db.lock(
                connection, RELABEL_LOCK
            )  # one relabel writer at a time: version numbers stay dense
            if self._exists(connection, relabel_id):
                raise StoreError(f"relabel_id: {relabel_id!r} already exists; relabels are never overwritten")
            if record.parent_id is not None and not self._exists(connection, record.parent_id):
                raise NotFoundError(f"parent_id: relabel {record.parent_id!r} does not exist")
            episodes = _episode_ids(connection, [labels.episode_uuid for labels in record.labels])
            for labels in record.labels:
                labels.validate(episodes[labels.episode_uuid][1])
            version = connection.scalar(
                sa.select(sa.func.coalesce(sa.func.max(Relabel.version), 0) + 1).where(
                    Relabel.method == record.method
                )
            )
            row = {
                "id": relabel_id,
                "method": record.method,
                "version": version,
                "parent_id": record.parent_id,
                "value_model_version": record.value_model_version,
                "config": record.config,
                "diagnostics": record.diagnostics,
            }
            connection.execute(Relabel.__table__.insert(), row)
            values = [
                (relabel_id, episodes[labels.episode_uuid][0], t, value, advantage, indicator)
                for labels in record.labels
                for t, (value, advantage, indicator) in enumerate(
                    zip(
                        labels.values.tolist(),
                        labels.advantages.tolist(),
                        labels.indicators.tolist(),
                        strict=True,
                    )
                )
            ]
            if values:
                self._db.bulk_insert(connection, RelabelValue, values)
        return relabel_id

    def load(self, relabel_id: str) -> RelabelRecord:
        """A stored relabel version with all its per-episode labels."""
        with self._db.read_session() as session:
            relabel = session.get(Relabel, relabel_id)
            if relabel is None:
                raise NotFoundError(f"relabel {relabel_id!r}: not in the store")
            uuids = dict(
                session.execute(
                    sa.select(Episode.id, Episode.uuid).join(
                        RelabelValue.__table__,
                        sa.and_(
                            RelabelValue.episode_id == Episode.id,
                            RelabelValue.relabel_id == relabel_id,
                            RelabelValue.t == 0,
                        ),
                    )
                ).all()
            )
            rows = self._db.raw_rows(session.connection(), VALUES_OF_RELABEL, (relabel_id,))
        return _record(relabel, _labels(rows, uuids))

    def list(self, method: str | None) -> list[RelabelRecord]:
        """Relabel versions (without labels), oldest first; ``method`` filters."""
        query = sa.select(Relabel).order_by(Relabel.created_at, Relabel.version)
        if method is not None:
            query = query.where(Relabel.method == method)
        with self._db.read_session() as session:
            return [_record(relabel, []) for relabel in session.scalars(query)]

    @staticmethod
    def _exists(connection: sa.Connection, relabel_id: str) -> bool:
        return connection.scalar(sa.select(Relabel.id).where(Relabel.id == relabel_id)) is not None


def _episode_ids(connection: sa.Connection, uuids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[int, int]]:
    """(row id, length) of each labelled episode; ``NotFoundError`` for one that is not stored."""
    found: dict[uuid.UUID, tuple[int, int]] = {}
    for batch in batches(uuids, 500):
        query = sa.select(Episode.uuid, Episode.id, Episode.length).where(Episode.uuid.in_(batch))
        found.update({row.uuid: (row.id, row.length) for row in connection.execute(query)})
    for episode_uuid in uuids:
        if episode_uuid not in found:
            raise NotFoundError(f"labels: episode {episode_uuid} is not in the store")
    return found


def _labels(rows: list[tuple[int, float, float, bool]], uuids: dict[int, uuid.UUID]) -> list[EpisodeLabels]:
    """Split ``relabel_values`` rows (ordered by episode, t) into one ``EpisodeLabels`` per episode."""
    episode_ids, values, advantages, indicators = transpose(rows, 4)
    ids = np.array(episode_ids, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if rows else np.zeros(0, int)
    bounds = [*starts.tolist(), len(rows)]
    value_array = np.array(values, dtype=np.float32)
    advantage_array = np.array(advantages, dtype=np.float32)
    indicator_array = np.array(indicators, dtype=bool)
    return [
        EpisodeLabels(
            episode_uuid=uuids[int(ids[start])],
            values=value_array[start:end].copy(),
            advantages=advantage_array[start:end].copy(),
            indicators=indicator_array[start:end].copy(),
        )
        for start, end in itertools.pairwise(bounds)
    ]


def _record(relabel: Relabel, labels: list[EpisodeLabels]) -> RelabelRecord:
    return RelabelRecord(
        method=relabel.method,
        labels=labels,
        value_model_version=relabel.value_model_version,
        parent_id=relabel.parent_id,
        config=relabel.config,
        diagnostics=relabel.diagnostics,
        relabel_id=relabel.id,
        version=relabel.version,
        created_at=as_utc(relabel.created_at),
    )
