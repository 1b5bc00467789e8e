"""One store's database handle: its engines, read sessions and the driver-level SQL helpers every part shares.

Per-step rows are written and read straight through the driver (``COPY`` / ``executemany``, raw cursors):
per-row SQLAlchemy processing would cost more than the SQL itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from storage.engine import create_engines, hide_password
from storage.schema import Base

T = TypeVar("T")


class Database:
    """The engines of one store URL (SQLite or PostgreSQL) and the SQL helpers that differ by backend."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.read_engine, self.write_engine = create_engines(url)
        self.read_session = sessionmaker(self.read_engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.read_engine.dialect.name

    def safe_url(self) -> str:
        """The URL with any password hidden (for error messages)."""
        return hide_password(sa.engine.make_url(self.url))

    def close(self) -> None:
        """Release pooled connections."""
        self.read_engine.dispose()

    def insert(self, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
        """The backend's ``INSERT`` (with ``ON CONFLICT`` support) into ``model``'s table."""
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        return insert(model.__table__)

    def insert_ignore(
        self,
        connection: sa.Connection | Session,
        model: type[Base],
        rows: list[dict[str, Any]],
        keys: list[str],
    ) -> None:
        """Insert rows (keyed by column name), skipping those whose ``keys`` already exist."""
        connection.execute(self.insert(model).on_conflict_do_nothing(index_elements=keys), rows)

    def bulk_insert(
        self,
        connection: sa.Connection,
        model: type[Base],
        rows: list[tuple[Any, ...]],
        skip_existing: bool = False,
    ) -> None:
        """Insert tuples in column order straight through the driver, inside the connection's transaction.

        ``COPY`` on PostgreSQL, ``executemany`` on SQLite: per-row SQLAlchemy parameter processing would cost
        more than the insert itself. With ``skip_existing`` rows whose key is already stored are skipped
        (``executemany`` of ``INSERT … ON CONFLICT DO NOTHING`` / ``INSERT OR IGNORE`` on both backends).
        """
        table = model.__table__
        columns = ", ".join(table.c.keys())
        if self.dialect == "postgresql" and not skip_existing:
            cursor = connection.connection.driver_connection.cursor()
            with cursor.copy(f"COPY {table.name} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return
        if self.dialect == "postgresql":
            marks = ", ".join(["%s"] * len(table.c))
            sql = f"INSERT INTO {table.name} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING"
        else:
            marks = ", ".join("?" * len(table.c))
            verb = "INSERT OR IGNORE" if skip_existing else "INSERT"
            sql = f"{verb} INTO {table.name} ({columns}) VALUES ({marks})"
        connection.exec_driver_sql(sql, rows)

    def raw_rows(self, connection: sa.Connection, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run a read query (``?`` placeholders) on ``connection`` straight through the driver.

        Per-step reads return hundreds of rows; skipping SQLAlchemy's per-row processing makes them ~5× faster.
        """
        cursor = connection.connection.driver_connection.cursor()
        try:
            cursor.execute(sql.replace("?", "%s") if self.dialect == "postgresql" else sql, params)
            return cursor.fetchall()
        finally:
            cursor.close()

    def lock(self, connection: sa.Connection, key: int) -> None:
        """Hold PostgreSQL advisory lock ``key`` until the transaction ends (SQLite writers are serialized)."""
        if self.dialect == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({int(key)})")


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items (keeps ``IN (…)`` lists under the backends' limits)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def as_utc(moment: dt.datetime) -> dt.datetime:
    """SQLite drops the time zone of stored timestamps; they are UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
