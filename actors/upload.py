"""The robot's upload client: sends spooled episodes to the ingest endpoint until each one is acknowledged.

For every pending episode (oldest first) the uploader POSTs its spooled bytes and marks it sent only after a
2xx answer (``stored`` or ``duplicate``). Because ingest is idempotent by UUID, a crash between the platform's
commit and ``mark_sent`` is harmless: the resend is acknowledged as a duplicate. Failures:

- network errors, timeouts and 5xx (the store is unreachable, the endpoint busy): retried with exponential
  backoff (``backoff_s · 2^k``, capped at ``max_backoff_s``, ±20 % seeded jitter) up to ``max_attempts`` tries
  in a row; then the episode stays pending for the next pass and the pass goes on with the next episode, so
  one episode that keeps failing never blocks the others. The pass stops when the endpoint cannot be reached
  at all, or two episodes in a row failed (then the platform, not the episode, is the problem); nothing is
  lost, ``pending`` shows them;
- 400/409/413/422 and episodes larger than ``max_episode_bytes``: the episode will never be accepted as it
  is, so it is marked ``rejected`` with the server's reason and moved aside in the spool (kept, never deleted,
  no longer retried; ``requeue_rejected`` / ``flywheel robot upload --retry-rejected`` sends it again once
  the platform is fixed), and the pass goes on;
- 401: a configuration error; ``UploadAuthError`` is raised and nothing is marked.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.spool import EpisodeSpool, SpoolEntry

_PERMANENT = (400, 409, 413, 422)


class UploadAuthError(RuntimeError):
    """The ingest endpoint refused the API key (HTTP 401)."""


class UploadConfig(BaseModel):
    """Where and how to upload (validated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    api_key: str = Field(min_length=1)
    max_attempts: int = Field(default=8, ge=1)
    backoff_s: float = Field(default=0.5, gt=0.0)
    max_backoff_s: float = Field(default=30.0, gt=0.0)
    timeout_s: float = Field(default=30.0, gt=0.0)
    max_episode_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    seed: int = 0


@dataclass
class UploadReport:
    """What one pass did (episode UUIDs as strings)."""

    stored: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    gave_up: str | None = None
    remaining: int = 0

    @property
    def complete(self) -> bool:
        """Whether nothing is left pending."""
        return self.remaining == 0


@dataclass(frozen=True)
class _Answer:
    kind: Literal["ok", "retry", "reject", "auth"]
    status: int | None
    message: str


class Uploader:
    """Uploads a spool's pending episodes to one ingest endpoint."""

    def __init__(self, spool: EpisodeSpool, config: UploadConfig) -> None:
        self.spool = spool
        self.config = config
        self._rng = random.Random(config.seed)
        self._sleep = time.sleep

    def upload_pending(self) -> UploadReport:
        """One pass over the pending episodes, oldest first.

        An episode still failing after ``max_attempts`` tries stays pending and the pass goes on; the pass
        stops early when the endpoint is unreachable or two episodes in a row failed.
        """
        report = UploadReport()
        failed_in_a_row = 0
        for entry in self.spool.pending():
            failure = self._upload_one(entry, report)
            failed_in_a_row = 0 if failure is None else failed_in_a_row + 1
            if failure is not None and (failure.status is None or failed_in_a_row >= 2):
                break
        report.remaining = len(self.spool.pending())
        return report

    def upload_until_empty(self, deadline_s: float) -> UploadReport:
        """Repeat passes (including episodes spooled meanwhile) until nothing is pending or the deadline."""
        total = UploadReport()
        end = time.monotonic() + deadline_s
        while True:
            report = self.upload_pending()
            total.stored += report.stored
            total.duplicates += report.duplicates
            total.rejected.update(report.rejected)
            total.retries += report.retries
            total.gave_up = report.gave_up
            total.remaining = report.remaining
            if report.complete or time.monotonic() >= end:
                return total
            self._sleep(min(self.config.max_backoff_s, max(0.0, end - time.monotonic())))

    def _upload_one(self, entry: SpoolEntry, report: UploadReport) -> _Answer | None:
        """Deliver one episode (or reject it); the last failed answer if it is still pending."""
        key = str(entry.uuid)
        if entry.size_bytes > self.config.max_episode_bytes:
            message = f"episode is {entry.size_bytes} bytes, limit {self.config.max_episode_bytes}"
            self.spool.mark_rejected(entry.uuid, message)
            report.rejected[key] = message
            return None
        payload = self.spool.payload(entry.uuid)
        for attempt in range(self.config.max_attempts):
            answer = self._post(payload)
            self.spool.record_attempt(entry.uuid, None if answer.kind == "ok" else answer.message)
            if answer.kind == "ok":
                self.spool.mark_sent(entry.uuid)
                (report.duplicates if answer.message == "duplicate" else report.stored).append(key)
                return None
            if answer.kind == "auth":
                raise UploadAuthError(f"{self.config.url}: {answer.message}")
            if answer.kind == "reject":
                self.spool.mark_rejected(entry.uuid, answer.message)
                report.rejected[key] = answer.message
                return None
            if attempt + 1 < self.config.max_attempts:
                report.retries += 1
                self._sleep(self._backoff(attempt))
        report.gave_up = f"episode {key}: {answer.message} (after {self.config.max_attempts} attempts)"
        return answer

    def _backoff(self, attempt: int) -> float:
        base = min(self.config.max_backoff_s, self.config.backoff_s * 2**attempt)
        return base * self._rng.uniform(0.8, 1.2)

    def _post(self, payload: bytes) -> _Answer:
        request = urllib.request.Request(
            f"{self.config.url.rstrip('/')}/episodes",
            data=payload,
            method="POST",
            headers={
                "Authorization": f"Api-Key {self.config.api_key}",
                "Content-Type": "application/msgpack",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                return _Answer("ok", response.status, json.loads(response.read())["status"])
        except urllib.error.HTTPError as error:
            message = _error_message(error)
            if error.code == 401:
                return _Answer("auth", 401, message)
            kind: Literal["reject", "retry"] = "reject" if error.code in _PERMANENT else "retry"
            return _Answer(kind, error.code, f"HTTP {error.code}: {message}")
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            return _Answer("retry", None, f"network: {getattr(error, 'reason', error)}")


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return error.reason if isinstance(error.reason, str) else str(error)
