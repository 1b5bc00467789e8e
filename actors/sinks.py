"""Where a rollout worker hands finished episodes: straight into the experience store, one transaction each."""

from __future__ import annotations

from storage import ExperienceStore
from storage.records import EpisodeRecord


class StoreSink:
    """Commits each episode to the experience store at ``url``; picklable, so it travels into Ray actors.

    The store is opened lazily in the process that writes, so a sink can be built on the driver and used in a
    worker. Writes are atomic and idempotent by episode UUID, so a retried episode is never duplicated.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._store: ExperienceStore | None = None

    def __call__(self, record: EpisodeRecord) -> bool:
        """Commit ``record``; True if it was new, False if the identical episode was already stored."""
        return self.store.write_episode(record)

    @property
    def store(self) -> ExperienceStore:
        """The open store (opened on first use in this process)."""
        if self._store is None:
            self._store = ExperienceStore(self.url)
        return self._store

    def __getstate__(self) -> dict[str, str]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["url"])
