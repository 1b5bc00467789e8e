"""Errors of the actor layer that the driver and the CLI catch without importing Ray (``actors.cluster`` does)."""

from __future__ import annotations

import traceback


class WorkerError(RuntimeError):
    """An exception raised in a rollout worker, as plain strings (always picklable, unlike many exceptions).

    ``type_name`` and ``message`` are the original exception's class name and text, ``traceback_text`` its
    traceback in the worker, ``worker`` the worker's index once the driver knows it. ``str()`` is one line.
    """

    def __init__(
        self, type_name: str, message: str, traceback_text: str = "", worker: int | None = None
    ) -> None:
        super().__init__(type_name, message, traceback_text, worker)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        self.worker = worker

    @classmethod
    def from_exception(cls, error: BaseException) -> WorkerError:
        """The picklable stand-in of ``error`` (itself if it already is one)."""
        if isinstance(error, WorkerError):
            return error
        return cls(type(error).__name__, str(error), "".join(traceback.format_exception(error)))

    def __str__(self) -> str:
        where = "" if self.worker is None else f"rollout worker {self.worker} failed: "
        return f"{where}{self.type_name}: {' '.join(self.message.split())}"


class ClusterConnectionError(ConnectionError):
    """The driver could not attach to the Ray cluster it was pointed at (the message names the address and the
    usual causes: the head is unreachable, or it uses token auth and the driver has no token)."""
