"""Engines for the two supported backends: SQLite (file, WAL, busy timeout, foreign keys) and PostgreSQL.

SQLite transactions are started explicitly: write transactions with ``BEGIN IMMEDIATE`` so that concurrent
writer processes queue on the busy timeout instead of failing on a stale snapshot, reads with a plain
``BEGIN``. ``write_engine`` is the same engine with that execution option set.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

BUSY_TIMEOUT_S = 60.0
BEGIN_OPTION = "flywheel_begin"


def create_engines(url: str | URL) -> tuple[Engine, Engine]:
    """Return ``(read_engine, write_engine)`` for ``url``; both share one connection pool."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
        return engine, engine.execution_options(**{BEGIN_OPTION: "BEGIN IMMEDIATE"})
    if parsed.get_backend_name() == "postgresql":
        engine = sa.create_engine(parsed, pool_pre_ping=True)
        return engine, engine
    raise ValueError(
        f"store url: expected sqlite:///… or postgresql+psycopg://…, got {parsed.render_as_string()}"
    )


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    if database in ("", ":memory:"):
        raise ValueError(
            "store url: expected a SQLite file (sqlite:///path.db); in-memory databases are not shared"
        )
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun explicitly below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql(connection.get_execution_options().get(BEGIN_OPTION, "BEGIN"))

    return engine


def create_scratch_database(
    server_url: str, prefix: str = "flywheel_scratch"
) -> tuple[str, Callable[[], None]]:
    """Create a uniquely named, empty PostgreSQL database on the server; return its URL and a function that drops it.

    For tests and benchmarks that must not share state with anything else on the server.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return make_url(server_url).set(database=name).render_as_string(hide_password=False), drop
