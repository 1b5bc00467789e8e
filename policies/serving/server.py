"""An openpi-compatible WebSocket policy server with the fixes openpi's users asked for.

Wire protocol (openpi's, byte for byte): on connect the server sends one binary msgpack-numpy frame with the
metadata; then lock-step, the client sends an observation and receives ``{"actions": H×D, "server_timing":
{"infer_ms", ...}, "policy_version": ...}``; on an error the server sends a text frame and closes with 1011;
``GET /healthz`` answers 200 ``OK`` (and ``GET /stats``, behind the API key, the counters as JSON).

Beyond openpi: binds 127.0.0.1 unless told otherwise; optional API-key auth checked in the HTTP
handshake (constant-time compare, 401 before any inference); a maximum message size; inference runs in a
worker thread so health checks and other clients stay responsive; concurrent requests are batched into one
``policy.infer``; each reply names the policy version; :meth:`PolicyServer.swap_policy` hot-swaps between
requests without dropping connections; :meth:`PolicyServer.shutdown` finishes in-flight requests and closes
with 1001; error frames carry a one-line message unless ``debug`` is on; an optional ``rtc`` request field
(:mod:`policies.serving.inpainting`) samples the chunk by Real-Time Chunking inpainting when the policy
supports it (ignored otherwise, as an openpi server would), also inside a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import http
import json
import logging
import os
import signal
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from websockets.asyncio.server import Request, Response, Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from core import msgpack_numpy
from core.batching import DynamicBatcher
from policies.base import ActionChunk, Observation, Policy, stack_observations
from policies.serving.inpainting import RTC_FIELD, can_inpaint, targets_from_wire
from policies.serving.observations import (
    ObservationError,
    ObservationKeys,
    ObservationSpec,
    observation_from_wire,
)

if TYPE_CHECKING:
    from policies.rtc import InpaintingTargets

logger = logging.getLogger(__name__)


#: Metadata flag: the server accepts the simulator state (``privileged``) in observations (``allow_privileged``).
PRIVILEGED_METADATA = "accepts_privileged"


@dataclass(frozen=True)
class ServerConfig:
    """How a :class:`PolicyServer` listens, authenticates, limits and batches.

    ``port=0`` picks a free port (read it back from :attr:`PolicyServer.port`); ``api_key=None`` disables
    auth. ``max_wait_ms`` is how long the first request of a batch may wait for others (never longer than it
    takes every connected client to have a request queued). ``keys`` accepts openpi-style flat field names
    instead of flywheel's nested observation. ``debug`` sends tracebacks in error frames. ``send_embeddings``
    adds the policy's per-observation backbone embeddings to each reply (for RLT over a remote VLA).
    ``allow_privileged`` accepts the simulator's full state (simulation only: serving scripted experts).
    ``shutdown_timeout_s`` bounds how long shutdown waits for in-flight requests.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    max_batch: int = 16
    max_wait_ms: float = 5.0
    debug: bool = False
    default_prompt: str | None = None
    keys: ObservationKeys | None = None
    send_embeddings: bool = False
    allow_privileged: bool = False
    shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be ≥ 0, got {self.max_wait_ms}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be ≥ 1024, got {self.max_message_bytes}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535 (0 picks a free port), got {self.port}")


class InferenceError(RuntimeError):
    """The policy raised, or returned actions of the wrong shape, for a request."""


class ServerStartError(OSError):
    """The server cannot listen on its host and port (port in use, address not available, no permission)."""

    @classmethod
    def of(cls, host: str, port: int, error: OSError) -> ServerStartError:
        """The one-line error for ``error``, raised binding ``host:port``."""
        reason = os.strerror(error.errno) if error.errno else str(error)
        if error.errno == errno.EADDRINUSE:
            reason += "; another server holds it (port 0 picks a free one)"
        return cls(f"cannot listen on {host}:{port} ({reason})")


@dataclass
class _Request:
    observation: Observation
    future: asyncio.Future[dict[str, Any]]
    inpainting: InpaintingTargets | None = None
    received: float = field(default_factory=time.monotonic)


class PolicyServer:
    """Serves one :class:`~policies.base.Policy` (swappable) to any number of openpi-protocol clients."""

    def __init__(
        self, policy: Policy, config: ServerConfig | None = None, spec: ObservationSpec | None = None
    ):
        self.config = config or ServerConfig()
        self._policy = policy
        self._spec = spec or ObservationSpec.of(policy)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-infer")
        self._batcher: DynamicBatcher[_Request] = DynamicBatcher(
            self._run_batch,
            self.config.max_batch,
            self.config.max_wait_ms,
            arrival=lambda request: request.received,
            clients=lambda: len(self._connections),
        )
        self._connections: set[ServerConnection] = set()
        self._in_flight = 0
        self._closing = False
        self._server: Server | None = None
        self._stopped: asyncio.Event | None = None
        self.port: int | None = None
        self._served = {"requests": 0, "batches": 0, "largest_batch": 0}

    @property
    def policy(self) -> Policy:
        """The policy that will answer the next batch."""
        return self._policy

    def swap_policy(self, policy: Policy) -> None:
        """Serve ``policy`` from the next batch on; open connections stay open (thread-safe).

        The new policy must keep the action shape and, if it declares one, the observation spec that connected
        clients were told in their metadata frame; otherwise a ``ValueError`` says what differs.
        """
        current, spec = self._policy, ObservationSpec.of(policy)
        before = (current.action_horizon, current.action_dim)
        if (policy.action_horizon, policy.action_dim) != before:
            raise ValueError(
                f"swap_policy: {policy.version} has action shape {(policy.action_horizon, policy.action_dim)},"
                f" connected clients expect {before}"
            )
        declares_spec = bool(spec.cameras) or spec.state_dim is not None
        if declares_spec and spec != self._spec and (self._spec.cameras or self._spec.state_dim is not None):
            raise ValueError(
                f"swap_policy: {policy.version} expects {spec}, connected clients send {self._spec}"
            )
        self._policy = policy
        if declares_spec:
            self._spec = spec
        logger.info("policy swapped to version %s", policy.version)

    def stats(self) -> dict[str, int]:
        """Counters since start: requests answered, batches run, largest batch, open connections, in flight."""
        return {**self._served, "connections": len(self._connections), "in_flight": self._in_flight}

    def metadata(self) -> dict[str, Any]:
        """The first frame every client receives."""
        policy = self._policy
        extra = getattr(policy, "metadata", None)
        return {
            **(extra if isinstance(extra, dict) else {}),
            "server": "flywheel",
            "policy_version": policy.version,
            "action_horizon": policy.action_horizon,
            "action_dim": policy.action_dim,
            **self._spec.to_metadata(),
            "max_message_bytes": self.config.max_message_bytes,
            "max_batch": self.config.max_batch,
            "auth": self.config.api_key is not None,
            "embeddings": self.config.send_embeddings,
            "rtc": can_inpaint(policy),
            PRIVILEGED_METADATA: self.config.allow_privileged,
        }

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (returns once the socket is bound; :attr:`port` is then set)."""
        self._stopped = asyncio.Event()
        try:
            self._server = await serve(
                self._handle,
                self.config.host,
                self.config.port,
                process_request=self._process_request,
                max_size=self.config.max_message_bytes,
                compression=None,
            )
        except OSError as error:
            raise ServerStartError.of(self.config.host, self.config.port, error) from error
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("serving %s on ws://%s:%d", self._policy.version, self.config.host, self.port)

    async def wait_stopped(self) -> None:
        """Block until :meth:`shutdown` has completed."""
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Stop accepting connections, finish in-flight requests, then close every connection with 1001."""
        if self._closing or self._server is None:
            return
        self._closing = True
        self._server.close(close_connections=False)
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        closing = [c.close(CloseCode.GOING_AWAY, "server shutting down") for c in self._connections]
        await asyncio.gather(*closing, return_exceptions=True)
        await self._server.wait_closed()
        await self._batcher.close()
        self._executor.shutdown(wait=True)
        assert self._stopped is not None
        self._stopped.set()
        logger.info("server stopped")

    def serve_forever(self, reload: Callable[[], Policy] | None = None) -> None:
        """Run until SIGINT/SIGTERM, then shut down gracefully (the ``flywheel serve`` entry point).

        With ``reload``, SIGHUP calls it in a worker thread and hot-swaps to the policy it returns (a failed
        reload is logged and the current policy keeps serving).
        """

        async def main() -> None:
            await self.start()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, lambda: loop.create_task(self.shutdown()))
            if reload is not None:
                loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload(reload)))
            await self.wait_stopped()

        asyncio.run(main())

    async def _reload(self, reload: Callable[[], Policy]) -> None:
        try:
            self.swap_policy(await asyncio.to_thread(reload))
        except Exception:
            logger.exception("reload failed; still serving %s", self._policy.version)

    # ---- HTTP handshake: health, auth, stats ----------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.config.api_key is not None and not self._authorized(request.headers.get("Authorization")):
            logger.warning("rejected connection from %s: missing or wrong API key", connection.remote_address)
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if request.path == "/stats":
            stats = {"policy_version": self._policy.version, **self.stats()}
            return connection.respond(http.HTTPStatus.OK, json.dumps(stats) + "\n")
        return None

    def _authorized(self, header: str | None) -> bool:
        expected = f"Api-Key {self.config.api_key}".encode()
        return header is not None and hmac.compare_digest(header.encode(), expected)

    # ---- connections ------------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        self._connections.add(connection)
        try:
            await connection.send(msgpack_numpy.packb(self.metadata()))
            previous_total_ms: float | None = None
            while True:
                message = await connection.recv()
                started = time.monotonic()
                self._in_flight += 1
                try:
                    reply = await self._answer(message)
                    if previous_total_ms is not None:
                        reply["server_timing"]["prev_total_ms"] = previous_total_ms
                    await connection.send(msgpack_numpy.packb(reply))
                finally:
                    self._in_flight -= 1
                previous_total_ms = (time.monotonic() - started) * 1000
        except ConnectionClosed:
            pass
        except (msgpack_numpy.WireFormatError, ObservationError, InferenceError) as error:
            await self._send_error(connection, error)
        except Exception as error:  # a bug must not take the server down: report it to this client only
            logger.exception("unexpected error while serving %s", connection.remote_address)
            await self._send_error(connection, error)
        finally:
            self._connections.discard(connection)

    async def _answer(self, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, str):
            raise ObservationError("observation: expected a binary msgpack frame, got a text frame")
        config = self.config
        decoded = msgpack_numpy.unpackb(message)
        observation = observation_from_wire(
            decoded, self._spec, config.keys, config.default_prompt, config.allow_privileged
        )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        await self._batcher.put(_Request(observation, future, self._inpainting_targets(decoded)))
        reply = await future
        if RTC_FIELD in decoded:
            reply.setdefault(RTC_FIELD, False)  # asked for RTC, but this policy cannot inpaint
        return reply

    def _inpainting_targets(self, decoded: dict[str, Any]) -> InpaintingTargets | None:
        """The request's RTC targets, if it sent some and the current policy can inpaint (else ignored)."""
        policy = self._policy
        if RTC_FIELD not in decoded or not can_inpaint(policy):
            return None
        return targets_from_wire(decoded[RTC_FIELD], policy.action_horizon, policy.action_dim)

    async def _send_error(self, connection: ServerConnection, error: Exception) -> None:
        if self.config.debug:
            text = "".join(traceback.format_exception(error))
        else:  # never an empty detail: the client must learn what went wrong from the one line
            text = f"{type(error).__name__}: {str(error) or 'no details (see the server log)'}"
        logger.info("error for %s: %s", connection.remote_address, text.splitlines()[-1] if text else error)
        with contextlib.suppress(ConnectionClosed):
            await connection.send(text)
            await connection.close(CloseCode.INTERNAL_ERROR, type(error).__name__)

    # ---- batching ---------------------------------------------------------------------------------

    async def _run_batch(self, requests: list[_Request]) -> None:
        """Answer one batch (gathered by :class:`~core.batching.DynamicBatcher` until ``max_batch``, every
        client, or ``max_wait_ms``): one ``policy.infer`` per group of stackable observations."""
        for group in _group_by_shape(requests):
            try:
                await self._infer_group(group)
            except Exception as error:  # a bug here must fail these requests, not hang every client
                logger.exception("batch of %d failed", len(group))
                for request in group:
                    _resolve(request.future, error=InferenceError(f"{type(error).__name__}: {error}"))

    async def _infer_group(self, requests: list[_Request]) -> None:
        policy = self._policy
        started = time.monotonic()
        targets = None
        if can_inpaint(policy):
            from policies.rtc import merge_targets  # torch, imported on use: clients stay torch-free

            parts = [request.inpainting for request in requests]
            targets = merge_targets(parts, [1] * len(requests), policy.action_horizon, policy.action_dim)
        try:
            chunk = await asyncio.get_running_loop().run_in_executor(
                self._executor, _infer, policy, [r.observation for r in requests], targets
            )
        except InferenceError as error:
            if len(requests) > 1:  # isolate the observation that broke the batch; the others get answers
                for request in requests:
                    await self._infer_group([request])
                return
            _resolve(requests[0].future, error=error)
            return
        infer_ms = (time.monotonic() - started) * 1000
        self._served["requests"] += len(requests)
        self._served["batches"] += 1
        self._served["largest_batch"] = max(self._served["largest_batch"], len(requests))
        for index, request in enumerate(requests):
            reply = _reply(chunk, index, policy.version, infer_ms, started, request)
            if targets is not None and request.inpainting is not None:
                reply[RTC_FIELD] = True
            if self.config.send_embeddings and chunk.embeddings is not None:
                reply["embeddings"] = np.ascontiguousarray(chunk.embeddings[index])
            _resolve(request.future, reply=reply)


def _infer(
    policy: Policy, observations: list[Observation], targets: InpaintingTargets | None = None
) -> ActionChunk:
    """Run in the worker thread: one ``policy.infer`` (RTC inpainting toward ``targets`` if given) over the
    stacked batch, with its output checked."""
    try:
        from policies.rtc import infer_with_targets

        chunk = infer_with_targets(policy, stack_observations(observations), targets)
    except Exception as error:
        raise InferenceError(f"policy {policy.version} failed: {type(error).__name__}: {error}") from error
    expected = (len(observations), policy.action_horizon, policy.action_dim)
    if chunk.actions.shape != expected:
        raise InferenceError(
            f"policy {policy.version} returned actions {chunk.actions.shape}, expected {expected}"
        )
    return chunk


def _reply(
    chunk: ActionChunk, index: int, version: str, infer_ms: float, started: float, request: _Request
) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "actions": np.ascontiguousarray(chunk.actions[index], dtype=np.float32),
        "policy_version": version,
        "server_timing": {
            "infer_ms": infer_ms,
            "queue_ms": (started - request.received) * 1000,
            "batch_size": int(chunk.actions.shape[0]),
        },
    }
    if chunk.timing:
        reply["policy_timing"] = dict(chunk.timing)
    return reply


def _resolve(
    future: asyncio.Future[dict[str, Any]],
    reply: dict[str, Any] | None = None,
    error: Exception | None = None,
) -> None:
    if future.done():  # the client went away and its handler was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(reply)


def _group_by_shape(requests: list[_Request]) -> list[list[_Request]]:
    """Split requests into groups that can be stacked (same cameras, image sizes and state length)."""
    groups: dict[tuple, list[_Request]] = defaultdict(list)
    for request in requests:
        obs = request.observation
        signature = (
            tuple(sorted((cam, img.shape) for cam, img in obs["images"].items())),
            obs["state"].shape,
        )
        groups[signature].append(request)
    return list(groups.values())


class BackgroundServer:
    """A :class:`PolicyServer` on its own event loop in a daemon thread (tests, benchmarks, embedding).

    Use as a context manager: ``with BackgroundServer(PolicyServer(policy, ServerConfig(port=0))) as bg:``
    then connect to ``bg.url``; leaving the block shuts the server down gracefully.
    """

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="policy-server", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``ws://host:port`` of the running server."""
        return f"ws://{self.server.config.host}:{self.server.port}"

    def start(self, timeout_s: float = 10.0) -> BackgroundServer:
        """Start the thread and wait until the server listens (a no-op if already started)."""
        if self._thread.is_alive():
            return self
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"policy server did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"policy server failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        """Shut down gracefully and join the thread."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self._loop).result()
            self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as error:  # reported to the starting thread by start()
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_until_complete(self.server.wait_stopped())
        self._loop.close()
