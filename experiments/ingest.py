"""The platform's ingest endpoint: robots upload finished episodes here, and they are committed to the store.

``POST /episodes`` with header ``Authorization: Api-Key KEY`` and a body of encoded episode bytes
(``storage.spool.encode_episode``: msgpack, never pickle). Every refusal is JSON ``{"error", "field"}`` (the
field it is about, where there is one), and nothing is written:

- ``401`` wrong or missing API key (constant-time compare, checked before the body is read);
- ``413`` body larger than ``max_episode_bytes`` (refused from ``Content-Length``/while reading);
- ``408`` the body stalled (no bytes for ``stall_timeout_s``) or took longer than ``upload_timeout_s``: the
  connection is closed and its buffer dropped;
- ``400`` not a decodable episode (bad msgpack, unknown/missing fields, bad array maps);
- ``422`` a value the store will never accept: what ``EpisodeRecord.validate`` refuses (shapes, dtypes, and
  the column limits both backends share: string lengths, NUL bytes, the 64-bit seed, JSON depth), an episode
  that does not fit its task's ``TaskSpec`` (state/action sizes, cameras), an unregistered policy version,
  or data the database itself refused;
- ``409`` the UUID is already stored with different content;
- ``503`` only what a retry can fix: the database is unreachable or locked, or the endpoint is busy
  (``max_concurrent_uploads`` uploads in progress, ``max_connections`` open connections); the robot keeps the
  episode and retries.

Success is ``201 {"uuid", "status": "stored"}``, or ``200 {"uuid", "status": "duplicate"}`` when the identical
episode is already stored (a robot resending after a lost acknowledgement), so an upload is idempotent by UUID.
``GET /healthz`` answers ``ok`` without auth. Decoding and validation run in a worker thread, so the event loop
(and ``/healthz``) stays responsive during a large upload. Binds 127.0.0.1 unless told otherwise. Built on
aiohttp.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import sqlalchemy as sa
from aiohttp import web

from policies.serving.server import ServerStartError
from storage.errors import SchemaNotReadyError, StoreUnavailableError
from storage.records import EpisodeRecord, EpisodeValidationError, TaskSpec
from storage.spool import EpisodeDecodeError, decode_episode
from storage.store import EpisodeConflictError, ExperienceStore

logger = logging.getLogger(__name__)

#: Store failures a retry can fix: the database is unreachable, restarting, locked or not yet upgraded.
_RETRYABLE = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    ConnectionError,
    TimeoutError,
    SchemaNotReadyError,
    StoreUnavailableError,  # no new connection could be opened (storage.engine names the URL)
)
#: Store failures no retry can fix: the database refused the data itself.
_REFUSED = (sa.exc.DataError, sa.exc.IntegrityError, ValueError, OverflowError, RecursionError)


@dataclass(frozen=True)
class IngestConfig:
    """Where the endpoint listens, what it accepts and how it bounds slow or abusive clients.

    ``port=0`` picks a free port. ``task_specs`` maps task names to the ``TaskSpec`` their episodes must fit;
    ``None`` means every Meta-World v3 task's spec (``metaworld_task_specs``), ``{}`` checks no task. Episodes
    of a task without a spec are accepted. ``stall_timeout_s`` is the longest silence tolerated from a client
    (an idle connection, a request's headers or a body that stops arriving); ``upload_timeout_s`` bounds a
    whole body.
    """

    api_key: str
    host: str = "127.0.0.1"
    port: int = 8100
    max_episode_bytes: int = 256 * 1024 * 1024
    register_unknown_versions: bool = False
    stall_timeout_s: float = 30.0
    upload_timeout_s: float = 600.0
    max_concurrent_uploads: int = 4
    max_connections: int = 256
    task_specs: Mapping[str, TaskSpec] | None = None

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("api_key: expected a non-empty string (the ingest endpoint always needs a key)")
        if self.max_episode_bytes < 1024:
            raise ValueError(f"max_episode_bytes: expected >= 1024, got {self.max_episode_bytes}")
        for name in ("stall_timeout_s", "upload_timeout_s", "max_concurrent_uploads", "max_connections"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")


def metaworld_task_specs() -> Mapping[str, TaskSpec]:
    """The spec of every Meta-World v3 task: a common state layout's size (``STATE_DIMS``: 7, 4, 10 or 39), 4-D
    action, 39-D privileged, its cameras."""
    from envs.metaworld_env import ACTION_DIM, CAMERAS, PRIVILEGED_DIM, STATE_DIMS
    from envs.tasks import task_names

    spec = TaskSpec(
        state_dims=STATE_DIMS,
        action_dim=ACTION_DIM,
        privileged_dim=PRIVILEGED_DIM,
        cameras=frozenset(CAMERAS),
    )
    return MappingProxyType(dict.fromkeys(task_names(), spec))


class _Refusal(Exception):
    """An upload refused before it reached the store (an HTTP status, a message and the field)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    body = {"error": (message.splitlines() or [""])[0]}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status)


class IngestApp:
    """The aiohttp application over an ``ExperienceStore`` (writes run in a worker thread, one at a time)."""

    def __init__(self, store: ExperienceStore, config: IngestConfig) -> None:
        self.store = store
        self.config = config
        self.task_specs = metaworld_task_specs() if config.task_specs is None else config.task_specs
        self._expected = f"Api-Key {config.api_key}".encode()
        self._write_lock = asyncio.Lock()
        self._uploads = asyncio.Semaphore(config.max_concurrent_uploads)
        self.app = web.Application(client_max_size=config.max_episode_bytes)
        self.app.router.add_get("/healthz", self._health)
        self.app.router.add_post("/episodes", self._ingest)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _ingest(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(header, self._expected):
            return _error(
                401, "Authorization: expected 'Api-Key <key>' with the ingest API key", "Authorization"
            )
        limit = self.config.max_episode_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"body: expected at most {limit} bytes, got {request.content_length}", "body")
        if self._uploads.locked():
            busy = f"busy: {self.config.max_concurrent_uploads} uploads in progress; retry later"
            return web.json_response({"error": busy}, status=503, headers={"Retry-After": "1"})
        async with self._uploads:  # bounds the memory of bodies and decoded episodes held at once
            try:
                record, size = await self._receive(request)
            except _Refusal as refusal:
                response = _error(refusal.status, str(refusal), refusal.field)
                if refusal.status in (408, 413):
                    await _answer_and_close(request, response)
                return response
            return await self._store(record, size)

    async def _receive(self, request: web.Request) -> tuple[EpisodeRecord, int]:
        """Read the body (bounded in size and time), then decode and validate it off the event loop."""
        body = await self._read_body(request)
        try:
            return await asyncio.to_thread(self._decode, body), len(body)
        except EpisodeDecodeError as error:
            raise _Refusal(400, f"episode: {error}", error.field_name) from None
        except EpisodeValidationError as error:
            raise _Refusal(422, f"episode: {error}", error.field_name) from None

    async def _read_body(self, request: web.Request) -> bytearray:
        """The body, bounded in size and time (grown as it arrives: a declared length reserves nothing)."""
        config = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.upload_timeout_s
        body = bytearray()
        try:
            async with asyncio.timeout(None) as timer:
                while True:
                    timer.reschedule(min(deadline, loop.time() + config.stall_timeout_s))
                    chunk = await request.content.readany()
                    if not chunk:
                        return body
                    body += chunk
                    if len(body) > config.max_episode_bytes:
                        raise _Refusal(
                            413, f"body: expected at most {config.max_episode_bytes} bytes", "body"
                        )
        except TimeoutError:
            logger.warning("upload from %s dropped after %d bytes: body stalled", request.remote, len(body))
            raise _Refusal(
                408,
                f"body: stalled (no data for {config.stall_timeout_s:g} s, or longer than "
                f"{config.upload_timeout_s:g} s in all); connection closed",
                "body",
            ) from None

    def _decode(self, body: bytearray) -> EpisodeRecord:
        record = decode_episode(body)
        spec = self.task_specs.get(record.task)
        if spec is not None:
            spec.check(record)
        return record

    async def _store(self, record: EpisodeRecord, size: int) -> web.Response:
        async with self._write_lock:
            try:
                inserted = await asyncio.to_thread(self._write, record)
            except EpisodeConflictError as error:
                return _error(409, str(error), "uuid")
            except EpisodeValidationError as error:
                return _error(422, f"episode: {error}", error.field_name)
            except Exception as error:
                return _store_failure(record, error)
        status = "stored" if inserted else "duplicate"
        logger.info("episode %s %s (%d bytes)", record.uuid, status, size)
        return web.json_response(
            {"uuid": str(record.uuid), "status": status}, status=201 if inserted else 200
        )

    def _write(self, record: EpisodeRecord) -> bool:
        if self.config.register_unknown_versions:
            for version in {v for v in [record.policy_version, *record.policy_versions] if v is not None}:
                self.store.register_policy_version(version, kind="robot-reported")
        return self.store.write_episode(record)


async def _answer_and_close(request: web.Request, response: web.Response) -> None:
    """Send ``response`` and close the connection at once: the rest of a stalled or oversized body is never
    read (aiohttp would otherwise linger, draining it for up to 10 s)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


def _store_failure(record: EpisodeRecord, error: Exception) -> web.Response:
    """503 for what a retry can fix, 422 for data the database refused, 500 for anything else (logged)."""
    cause = error.orig if isinstance(error, sa.exc.StatementError) and error.orig is not None else error
    described = f"{type(cause).__name__}: {cause}"
    retryable = isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated
    if retryable or isinstance(error, _RETRYABLE) or isinstance(cause, _RETRYABLE):
        logger.warning("episode %s: store unavailable: %s", record.uuid, described)
        return _error(503, f"store unavailable: {described}")
    if isinstance(cause, _REFUSED) or isinstance(error, _REFUSED):
        logger.warning("episode %s: refused by the database: %s", record.uuid, described)
        return _error(422, f"episode: refused by the database: {described}", "episode")
    logger.exception("episode %s: store write failed", record.uuid)
    return _error(500, f"internal error: {described}")


_BUSY = b'{"error": "busy: too many connections; retry later"}'


class _Busy(asyncio.Protocol):
    """A connection over ``max_connections``: answered 503 and closed before anything is read."""

    RESPONSE = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.RESPONSE)
        transport.close()


class IngestServer:
    """Runs an ``IngestApp`` on its own event loop in a daemon thread (tests, benchmarks, the CLI).

    Connections beyond ``max_connections`` are answered 503 and closed; a connection silent for
    ``stall_timeout_s`` (idle, or stuck in its headers) is closed.
    """

    def __init__(self, store: ExperienceStore, config: IngestConfig) -> None:
        self.ingest = IngestApp(store, config)
        self.config = config
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(
            self.ingest.app, access_log=None, keepalive_timeout=config.stall_timeout_s
        )
        self._listener: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="ingest", daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port`` of the running endpoint."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Open HTTP connections (0 before ``start``)."""
        http = self._runner.server
        return 0 if http is None else len(http.connections)

    def start(self) -> IngestServer:
        """Start listening (returns once the socket is bound; ``ServerStartError`` if it cannot be)."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except OSError as error:
            self.stop()
            raise ServerStartError.of(self.config.host, self.config.port, error) from error
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        http = self._runner.server
        assert http is not None

        def protocol() -> asyncio.BaseProtocol:
            return _Busy() if len(http.connections) >= self.config.max_connections else http()

        self._listener = await asyncio.get_running_loop().create_server(
            protocol, self.config.host, self.config.port, reuse_address=True
        )
        self.port = self._listener.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Stop listening, close the connections and end the thread."""
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()

    def __enter__(self) -> IngestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
