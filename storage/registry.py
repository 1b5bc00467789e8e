"""The names other rows refer to: registered policy versions (with an id ↔ name cache) and runs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from storage.database import Database
from storage.errors import UnknownPolicyVersionError
from storage.records import EpisodeRecord, EpisodeValidationError
from storage.schema import PolicyVersion, Run


class PolicyRegistry:
    """Registered policy versions; names and row ids are cached once seen (versions are never deleted)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}

    def register(
        self,
        version: str,
        kind: str,
        uri: str | None = None,
        parent: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        """Register ``version`` (idempotent: an existing version is returned unchanged); its row id."""
        if not version or not isinstance(version, str):
            raise EpisodeValidationError("version", "a non-empty str", repr(version))
        parent_id = self.id_of(parent, "parent") if parent is not None else None
        row = {
            "version": version,
            "kind": kind,
            "uri": uri,
            "parent_id": parent_id,
            "metadata": metadata or {},
        }
        with self._db.write_engine.begin() as connection:
            self._db.insert_ignore(connection, PolicyVersion, [row], ["version"])
            version_id = connection.scalar(
                sa.select(PolicyVersion.id).where(PolicyVersion.version == version)
            )
        assert version_id is not None
        self._remember([(version, version_id)])
        return version_id

    def versions(self, uri_prefix: str | None = None) -> list[dict[str, Any]]:
        """Registered policy versions, oldest first; ``uri_prefix`` keeps those whose uri starts with it."""
        if uri_prefix is None:
            return self._rows(sa.true())
        return self._rows(PolicyVersion.uri.startswith(uri_prefix, autoescape=True))

    def version(self, version: str) -> dict[str, Any] | None:
        """The registered row of ``version`` (as in ``versions``), or None; one indexed lookup."""
        rows = self._rows(PolicyVersion.version == version)
        return rows[0] if rows else None

    def _rows(self, where: sa.ColumnElement[bool]) -> list[dict[str, Any]]:
        parent = sa.orm.aliased(PolicyVersion)
        query = (
            sa.select(PolicyVersion, parent.version)
            .outerjoin(parent, PolicyVersion.parent_id == parent.id)
            .where(where)
            .order_by(PolicyVersion.id)
        )
        with self._db.read_session() as session:
            return [
                {
                    "version": row.version,
                    "kind": row.kind,
                    "uri": row.uri,
                    "parent": parent_version,
                    "metadata": row.metadata_,
                    "created_at": row.created_at,
                }
                for row, parent_version in session.execute(query)
            ]

    def id_of(self, version: str, field_name: str) -> int:
        """The row id of a registered ``version``; ``UnknownPolicyVersionError`` naming ``field_name`` if none."""
        if version not in self._ids:
            self._load(PolicyVersion.version.in_({version}))
        if version not in self._ids:
            raise _unknown(field_name, version)
        return self._ids[version]

    def ids_for(self, record: EpisodeRecord) -> dict[str, int]:
        """Row ids of every version the episode or its steps name; all must be registered."""
        names = {v for v in record.policy_versions if v is not None}
        if record.policy_version is not None:
            names.add(record.policy_version)
        missing = names - self._ids.keys()
        if missing:
            self._load(PolicyVersion.version.in_(missing))
        if record.policy_version is not None and record.policy_version not in self._ids:
            raise _unknown("policy_version", record.policy_version)
        for name in names - self._ids.keys():
            raise _unknown(f"policy_versions[{record.policy_versions.index(name)}]", name)
        return {name: self._ids[name] for name in names}

    def names_of(self, ids: Iterable[int | None]) -> list[str | None]:
        """The version name of each row id (None stays None)."""
        ids = list(ids)
        missing = {i for i in ids if i is not None} - self._names.keys()
        if missing:
            self._load(PolicyVersion.id.in_(missing))
        return [None if i is None else self._names[i] for i in ids]

    def _load(self, where: sa.ColumnElement[bool]) -> None:
        with self._db.read_session() as session:
            rows = session.execute(sa.select(PolicyVersion.version, PolicyVersion.id).where(where)).all()
        self._remember(rows)

    def _remember(self, rows: Iterable[tuple[str, int]]) -> None:
        for name, version_id in rows:
            self._ids[name] = version_id
            self._names[version_id] = name


def _unknown(field_name: str, name: str) -> UnknownPolicyVersionError:
    return UnknownPolicyVersionError(
        field_name, "a registered policy version (ExperienceStore.register_policy_version)", repr(name)
    )


class RunRegistry:
    """Collection and training runs; episodes and evaluations naming an unknown run create it."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def register(self, run_id: str, name: str | None = None, config: dict[str, Any] | None = None) -> None:
        """Record a run (idempotent)."""
        with self._db.write_engine.begin() as connection:
            self._db.insert_ignore(
                connection, Run, [{"id": run_id, "name": name, "config": config or {}}], ["id"]
            )

    def ensure(self, connection: sa.Connection, run_id: str | None) -> None:
        """Inside the caller's transaction: create run ``run_id`` unless it exists (nothing for None)."""
        if run_id is not None:
            self._db.insert_ignore(connection, Run, [{"id": run_id, "config": {}}], ["id"])

    def claim_episode_index(self, run_id: str) -> int:
        """Take run ``run_id``'s next never-used episode index (the run is created if needed), atomically.

        One ``UPDATE … RETURNING`` of the run's counter: concurrent claimers queue on the row and each gets its
        own index. An index whose episode is never committed (its process died) is not handed out again.
        """
        with self._db.write_engine.begin() as connection:
            self.ensure(connection, run_id)
            claimed = connection.execute(
                sa.update(Run)
                .where(Run.id == run_id)
                .values(next_episode_index=Run.next_episode_index + 1)
                .returning(Run.next_episode_index)
            ).scalar_one()
        return int(claimed) - 1

    def lock(self, connection: sa.Connection, run_id: str) -> None:
        """Inside the caller's write transaction: hold run ``run_id``'s row until it ends (creating the run).

        Writers that lock the run are serialized (on SQLite every write transaction already is); episode
        inserts that do not lock it are not blocked (``FOR NO KEY UPDATE``).
        """
        self.ensure(connection, run_id)
        connection.execute(sa.select(Run.id).where(Run.id == run_id).with_for_update(key_share=True))

    def runs(self, prefix: str | None = None) -> list[dict[str, Any]]:
        """Recorded runs (id, name, config, created_at), oldest first; ``prefix`` filters on the id."""
        query = sa.select(Run).order_by(Run.created_at, Run.id)
        if prefix is not None:
            query = query.where(Run.id.startswith(prefix, autoescape=True))
        with self._db.read_session() as session:
            return [
                {"id": run.id, "name": run.name, "config": run.config, "created_at": run.created_at}
                for run in session.scalars(query)
            ]
