"""The platform's ingest endpoint: robots upload finished episodes here, and they are committed to the store.

``POST /episodes`` with header ``Authorization: Api-Key KEY`` and a body of encoded episode bytes
(``storage.spool.encode_episode``: msgpack, never pickle). Checks, in order, each a one-line error and
nothing written:

- ``401`` wrong or missing API key (constant-time compare, checked before the body is read);
- ``413`` body larger than ``max_episode_bytes`` (refused from ``Content-Length``/while reading);
- ``400`` not a decodable episode (bad msgpack, unknown/missing fields, bad array maps);
- ``422`` fields, shapes or dtypes that ``EpisodeRecord.validate`` refuses, or an unregistered policy version;
- ``409`` the UUID is already stored with different content;
- ``503`` the store failed (unreachable database, ...): the robot keeps the episode and retries.

Success is ``201 {"uuid", "status": "stored"}``, or ``200 {"uuid", "status": "duplicate"}`` when the identical
episode is already stored (a robot resending after a lost acknowledgement), so an upload is idempotent by UUID.
``GET /healthz`` answers ``ok`` without auth. Binds 127.0.0.1 unless told otherwise. Built on aiohttp.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from dataclasses import dataclass

from aiohttp import web

from storage.records import EpisodeRecord, EpisodeValidationError
from storage.spool import EpisodeDecodeError, decode_episode
from storage.store import EpisodeConflictError, ExperienceStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestConfig:
    """Where the endpoint listens and what it accepts (``port=0`` picks a free port)."""

    api_key: str
    host: str = "127.0.0.1"
    port: int = 8100
    max_episode_bytes: int = 256 * 1024 * 1024
    register_unknown_versions: bool = False

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("api_key: expected a non-empty string (the ingest endpoint always needs a key)")
        if self.max_episode_bytes < 1024:
            raise ValueError(f"max_episode_bytes: expected >= 1024, got {self.max_episode_bytes}")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class IngestApp:
    """The aiohttp application over an ``ExperienceStore`` (writes run in a worker thread, one at a time)."""

    def __init__(self, store: ExperienceStore, config: IngestConfig) -> None:
        self.store = store
        self.config = config
        self._expected = f"Api-Key {config.api_key}".encode()
        self._write_lock = asyncio.Lock()
        self.app = web.Application(client_max_size=config.max_episode_bytes)
        self.app.router.add_get("/healthz", self._health)
        self.app.router.add_post("/episodes", self._ingest)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _ingest(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(header, self._expected):
            return _error(401, "Authorization: expected 'Api-Key <key>' with the ingest API key")
        limit = self.config.max_episode_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"body: expected at most {limit} bytes, got {request.content_length}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body: expected at most {limit} bytes")
        try:
            record = decode_episode(body)
        except EpisodeDecodeError as error:
            return _error(400, f"episode: {error}")
        except EpisodeValidationError as error:
            return _error(422, f"episode: {error}")
        async with self._write_lock:
            try:
                inserted = await asyncio.to_thread(self._write, record)
            except EpisodeConflictError as error:
                return _error(409, str(error))
            except EpisodeValidationError as error:
                return _error(422, f"episode: {error}")
            except Exception as error:  # the store is unreachable or failed: the robot keeps it and retries
                logger.exception("episode %s: store write failed", record.uuid)
                return _error(503, f"store unavailable: {type(error).__name__}: {error}".splitlines()[0])
        status = "stored" if inserted else "duplicate"
        logger.info("episode %s %s (%d bytes)", record.uuid, status, len(body))
        return web.json_response(
            {"uuid": str(record.uuid), "status": status}, status=201 if inserted else 200
        )

    def _write(self, record: EpisodeRecord) -> bool:
        if self.config.register_unknown_versions:
            for version in {v for v in [record.policy_version, *record.policy_versions] if v is not None}:
                self.store.register_policy_version(version, kind="robot-reported")
        return self.store.write_episode(record)


class IngestServer:
    """Runs an ``IngestApp`` on its own event loop in a daemon thread (tests, benchmarks, the CLI)."""

    def __init__(self, store: ExperienceStore, config: IngestConfig) -> None:
        self.ingest = IngestApp(store, config)
        self.config = config
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self.ingest.app, access_log=None)
        self._thread = threading.Thread(target=self._loop.run_forever, name="ingest", daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port`` of the running endpoint."""
        return f"http://{self.config.host}:{self.port}"

    def start(self) -> IngestServer:
        """Start listening (returns once the socket is bound)."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        """Stop listening and end the thread."""
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> IngestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
