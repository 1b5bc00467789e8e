"""Schema revisions: Alembic upgrades with the bundled migrations and the once-per-store head check."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from storage.database import Database
from storage.errors import SchemaNotReadyError

UPGRADE_LOCK = 742001


class SchemaMigrator:
    """Brings a database to the bundled schema head and checks, once, that it is there."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._ready = False

    def upgrade(self, revision: str = "head") -> None:
        """Create or migrate the schema to ``revision``; safe to repeat and to run concurrently."""
        config = _config()
        with self._db.write_engine.begin() as connection:
            self._db.lock(connection, UPGRADE_LOCK)  # serialize concurrent upgrades of the same database
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        self._ready = False

    def current(self) -> str | None:
        """The Alembic revision the database is at (None for an empty database)."""
        with self._db.read_engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @staticmethod
    def head() -> str:
        """The newest revision the bundled migrations know."""
        head = ScriptDirectory.from_config(_config()).get_current_head()
        assert head is not None
        return head

    def require(self) -> None:
        """Raise ``SchemaNotReadyError`` unless the database is at the bundled head (checked once)."""
        if self._ready:
            return
        current, head = self.current(), self.head()
        if current != head:
            raise SchemaNotReadyError(
                f"store {self._db.safe_url()} is at schema revision {current!r}, expected {head!r}: "
                "run `flywheel db upgrade --db URL` or ExperienceStore(url).upgrade()"
            )
        self._ready = True


def _config() -> Config:
    """Alembic configuration pointing at the migrations shipped inside the package."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("storage") / "migrations"))
    return config
