"""The store's own errors (validation errors of records live in ``storage.records``)."""

from __future__ import annotations

from storage.records import EpisodeValidationError


class StoreError(RuntimeError):
    """Base class of the store's own errors."""


class EpisodeConflictError(StoreError):
    """An episode with this UUID is already stored with different content."""


class RunFullError(StoreError):
    """The episode's run already holds the number of episodes the write was limited to; nothing was written."""


class UnknownPolicyVersionError(EpisodeValidationError):
    """A record names a policy version that was never registered."""


class NotFoundError(StoreError, LookupError):
    """The requested episode, relabel or policy version does not exist."""


class SchemaNotReadyError(StoreError):
    """The database is not at the schema head: run ``flywheel db upgrade`` (``ExperienceStore.upgrade()``)."""


class StoreURLError(StoreError, ValueError):
    """The store URL cannot be parsed or names a backend other than SQLite and PostgreSQL."""


class StoreUnavailableError(StoreError):
    """The store's database cannot be reached or opened (server down, no such database, not a SQLite file)."""
