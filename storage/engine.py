"""Engines for the two supported backends: SQLite (file, WAL, busy timeout, foreign keys) and PostgreSQL.

SQLite transactions are started explicitly: write transactions with ``BEGIN IMMEDIATE`` so that concurrent
writer processes queue on the busy timeout instead of failing on a stale snapshot, reads with a plain
``BEGIN``. ``write_engine`` is the same engine with that execution option set.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from storage.errors import StoreUnavailableError, StoreURLError

BUSY_TIMEOUT_S = 60.0
BEGIN_OPTION = "flywheel_begin"
EXPECTED_URLS = "sqlite:///path.db or postgresql+psycopg://user@host:port/database"


def create_engines(url: str | URL) -> tuple[Engine, Engine]:
    """Return ``(read_engine, write_engine)`` for ``url``; both share one connection pool.

    A URL that cannot be parsed or names another backend raises :class:`StoreURLError`; a database that cannot
    be connected to or opened raises :class:`StoreUnavailableError` when a connection is first attempted
    (both name the URL, password hidden).
    """
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
        _name_connect_failures(engine)
        return engine, engine.execution_options(**{BEGIN_OPTION: "BEGIN IMMEDIATE"})
    if parsed.get_backend_name() == "postgresql":
        engine = sa.create_engine(parsed, pool_pre_ping=True)
        _name_connect_failures(engine)
        return engine, engine
    raise StoreURLError(f"store url: expected {EXPECTED_URLS}, got {hide_password(parsed)}")


def _parse(url: str | URL) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise StoreURLError(f"store url: expected {EXPECTED_URLS}, got {hide_password(url)!r}") from None


def hide_password(url: str | URL) -> str:
    """``url`` with its password, if it has one, shown as ``***`` (for messages, logs and tracked params).

    Works on text that does not parse as a URL too, so a malformed URL's password is hidden as well.
    """
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)


def _name_connect_failures(engine: Engine) -> None:
    """Turn a failure to open a new connection (server down, no such database, not a SQLite file, a folder
    that cannot be written) into one :class:`StoreUnavailableError` naming the URL."""

    @sa.event.listens_for(engine, "handle_error")
    def _on_error(context: sa.engine.ExceptionContext) -> StoreUnavailableError | None:
        if context.connection is not None or context.is_pre_ping:
            return None  # a failed statement on an open connection keeps its own error
        reason = str(context.original_exception).strip().splitlines()[0] if context.original_exception else ""
        if engine.dialect.name == "sqlite":
            return StoreUnavailableError(
                f"store {hide_password(engine.url)}: cannot open a SQLite database ({reason})"
            )
        return StoreUnavailableError(
            f"store {hide_password(engine.url)}: cannot connect ({reason}); is the server up and the database created?"
        )


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    if database in ("", ":memory:"):
        raise StoreURLError(
            "store url: expected a SQLite file (sqlite:///path.db); in-memory databases are not shared"
        )
    folder = Path(database).expanduser().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "a file is in the way" if isinstance(error, FileExistsError) else error.strerror or error
        raise StoreUnavailableError(
            f"store {hide_password(url)}: cannot create its folder {folder} ({reason})"
        ) from None
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
