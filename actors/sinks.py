"""Where a rollout worker hands finished episodes, and where it takes episode indices: the experience store."""

from __future__ import annotations

from typing import Any

from storage import ExperienceStore
from storage.records import EpisodeRecord


class _LazyStore:
    """Picklable handle on the store at ``url``, opened on first use in the process that uses it (a worker)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._store: ExperienceStore | None = None

    @property
    def store(self) -> ExperienceStore:
        """The open store (opened on first use in this process)."""
        if self._store is None:
            self._store = ExperienceStore(self.url)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_store"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _store=None)


class StoreSink(_LazyStore):
    """Commits each episode to the experience store at ``url``; picklable, so it travels into Ray actors.

    The store is opened lazily in the process that writes, so a sink can be built on the driver and used in a
    worker. Writes are atomic and idempotent by episode UUID, so a retried episode is never duplicated. With
    ``max_run_episodes`` an episode is refused (``storage.RunFullError``) once its run holds that many, which
    holds a run's episode target across every process collecting it.
    """

    def __init__(self, url: str, max_run_episodes: int | None = None) -> None:
        super().__init__(url)
        self.max_run_episodes = max_run_episodes

    def __call__(self, record: EpisodeRecord) -> bool:
        """Commit ``record``; True if it was new, False if the identical episode was already stored."""
        return self.store.write_episode(record, max_run_episodes=self.max_run_episodes)


class RunEpisodeIndex(_LazyStore):
    """Claims the next never-used episode index of run ``run_id`` in the store at ``url``; picklable.

    Every process collecting the run (a resumed one, a concurrent one, a Ray worker) draws from the same
    counter, so an index, and the episode seed derived from it, is used at most once per run.
    """

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(url)
        self.run_id = run_id

    def __call__(self) -> int:
        """A fresh index of the run (atomic in the store)."""
        return self.store.claim_episode_index(self.run_id)
