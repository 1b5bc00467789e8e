"""A :class:`~policies.base.Policy` served by any openpi-compatible WebSocket server.

Talks openpi's protocol (metadata frame on connect, then lock-step msgpack-numpy request/response) to
flywheel's own ``flywheel serve`` or to a real openpi π0/π0.5 server on a GPU machine. Field names are mapped
with :class:`~policies.serving.ObservationKeys` (``None`` = flywheel's nested observation); a batch is sent
one observation at a time, as openpi servers take single observations.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from core import msgpack_numpy
from policies.base import ActionChunk, Observation, ObservationBatch, batch_size
from policies.serving.inpainting import RTC_FIELD, RTCRequest
from policies.serving.observations import ObservationKeys, observation_to_wire

if TYPE_CHECKING:
    from policies.rtc import InpaintingTargets

logger = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The policy server answered with an error frame, closed the connection, or did not answer in time."""


class AuthenticationError(ServerError):
    """The server refused the connection's API key (HTTP 401 in the handshake)."""


class MissingMetadataError(ServerError):
    """The server's metadata lacks ``name`` (``action_horizon`` or ``action_dim``) and none was passed in."""

    def __init__(self, name: str) -> None:
        super().__init__(f"server metadata has no {name!r}; pass {name}= to OpenPIClientPolicy")
        self.name = name


@dataclass(frozen=True)
class _ConnectSettings:
    url: str
    headers: dict[str, str] | None
    connect_timeout_s: float
    retry_interval_s: float
    request_timeout_s: float | None
    max_message_bytes: int | None


class _Channel:
    """One lock-step WebSocket connection: connect with retries, then one request/reply at a time."""

    def __init__(self, settings: _ConnectSettings) -> None:
        self.settings = settings
        self.connection: ClientConnection | None = None
        self.metadata: dict[str, Any] = {}

    def connect(self) -> dict[str, Any]:
        """Connect (retrying until ``connect_timeout_s``) and return the metadata frame."""
        settings = self.settings
        deadline = time.monotonic() + settings.connect_timeout_s
        while True:
            try:
                connection = connect(
                    settings.url,
                    additional_headers=settings.headers,
                    max_size=settings.max_message_bytes,
                    compression=None,
                    open_timeout=max(0.1, deadline - time.monotonic()),
                )
                break
            except InvalidStatus as error:
                if error.response.status_code == 401:
                    raise AuthenticationError(f"{settings.url} refused the API key (HTTP 401)") from error
                last_error: Exception = error
            except (OSError, TimeoutError) as error:
                last_error = error
            if time.monotonic() + settings.retry_interval_s > deadline:
                raise ServerError(
                    f"could not connect to {settings.url} within {settings.connect_timeout_s} s: {last_error}"
                ) from last_error
            time.sleep(settings.retry_interval_s)
        metadata = msgpack_numpy.unpackb(connection.recv(timeout=settings.connect_timeout_s))
        if not isinstance(metadata, dict):
            connection.close()
            raise ServerError(f"metadata frame is a {type(metadata).__name__}, expected a map")
        self.connection, self.metadata = connection, metadata
        return metadata

    def request(self, message: bytes) -> dict[str, Any]:
        """One round trip; a connection the server closed gracefully is re-opened and the message resent."""
        for attempt in range(2):
            try:
                return self._round_trip(message)
            except ConnectionClosed as closed:
                self.connection = None
                code = closed.rcvd.code if closed.rcvd is not None else None
                if code in (CloseCode.INTERNAL_ERROR, CloseCode.MESSAGE_TOO_BIG) or attempt == 1:
                    raise ServerError(_describe_close(closed, len(message))) from closed
                logger.info("policy server closed the connection (%s); reconnecting", code)
        raise AssertionError("unreachable")

    def _round_trip(self, message: bytes) -> dict[str, Any]:
        if self.connection is None:
            self.connect()
        assert self.connection is not None
        started = time.monotonic()
        self.connection.send(message)
        try:
            response = self.connection.recv(timeout=self.settings.request_timeout_s)
        except TimeoutError as error:
            self.close()  # a late reply would break lock-step
            timeout = self.settings.request_timeout_s
            raise ServerError(f"no reply from {self.settings.url} within {timeout} s") from error
        if isinstance(response, str):
            self.close()
            raise ServerError(f"policy server error: {response}")
        reply = msgpack_numpy.unpackb(response)
        if not isinstance(reply, dict) or "actions" not in reply:
            raise ServerError(f"policy server reply has no 'actions': {type(reply).__name__}")
        reply["round_trip_ms"] = (time.monotonic() - started) * 1000
        return reply

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class OpenPIClientPolicy:
    """A remote policy: ``infer`` sends each observation of the batch and stacks the returned chunks.

    ``version``, ``action_horizon`` and ``action_dim`` come from the server's metadata frame (flywheel
    servers send them); a server that does not (openpi's usually send ``{}``) needs them passed in. A given
    ``action_horizon`` may be shorter than the server's (chunks are cut to it); a given ``action_dim`` must
    match the server's. ``version`` follows ``policy_version`` in every reply, so
    after a server-side hot swap it names the weights that produced the last chunk. ``send_privileged``
    sends the simulator's full state (simulated robots and scripted experts only). ``connections`` > 1 opens
    that many lock-step connections and sends a batch's observations over them concurrently, so a batching
    server (flywheel's) can answer them in one inference. ``supports_inpainting`` is the server's ``rtc``
    metadata flag: then ``infer(batch, inpainting=targets)`` sends each row's RTC targets in the ``rtc``
    field (:mod:`policies.serving.inpainting`), so rollouts in RTC mode work over the wire.
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        keys: ObservationKeys | None = None,
        connect_timeout_s: float = 30.0,
        retry_interval_s: float = 0.5,
        request_timeout_s: float | None = 60.0,
        max_message_bytes: int | None = 64 * 1024 * 1024,
        action_horizon: int | None = None,
        action_dim: int | None = None,
        version: str | None = None,
        send_privileged: bool = False,
        connections: int = 1,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be ≥ 1, got {connections}")
        self.url = url if url.startswith("ws") else f"ws://{url}"
        self.keys = keys
        self.send_privileged = send_privileged
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        settings = _ConnectSettings(
            self.url, headers, connect_timeout_s, retry_interval_s, request_timeout_s, max_message_bytes
        )
        self._channels = [_Channel(settings) for _ in range(connections)]
        self.metadata: dict[str, Any] = self._channels[0].connect()
        for channel in self._channels[1:]:
            channel.connect()
        self._pool = ThreadPoolExecutor(connections, "openpi-client") if connections > 1 else None
        self.version: str = str(self.metadata.get("policy_version") or version or f"openpi@{self.url}")
        self.action_horizon: int = _chunk_size(self.metadata, "action_horizon", action_horizon)
        self.action_dim: int = _chunk_size(self.metadata, "action_dim", action_dim)
        self.supports_inpainting: bool = bool(self.metadata.get(RTC_FIELD, False))

    # ---- Policy protocol ---------------------------------------------------------------------------------

    def infer(self, batch: ObservationBatch, inpainting: InpaintingTargets | None = None) -> ActionChunk:
        """Send the batch's observations (lock-step per connection) and stack the chunks into ``B×H×D``;
        ``inpainting`` (one row per observation) goes along as each request's ``rtc`` field."""
        observations = _unbatch(batch)
        requests = _rtc_requests(inpainting, len(observations))
        if self._pool is None or len(observations) == 1:
            channel = self._channels[0]
            replies = [
                self._request(channel, obs, rtc) for obs, rtc in zip(observations, requests, strict=True)
            ]
        else:
            replies = self._infer_spread(observations, requests)
        embeddings = [reply.get("embeddings") for reply in replies]
        infer_ms = [float(reply.get("server_timing", {}).get("infer_ms", np.nan)) for reply in replies]
        return ActionChunk(
            actions=np.stack([self._actions(reply) for reply in replies]),
            embeddings=np.stack(embeddings) if all(e is not None for e in embeddings) else None,
            timing={
                "server_infer_ms": float(np.mean(infer_ms)),
                "round_trip_ms": float(np.mean([reply["round_trip_ms"] for reply in replies])),
            },
        )

    def reset(self) -> None:
        """Nothing to clear: the server keeps no per-episode state for a client (as in openpi)."""

    # ---- requests ----------------------------------------------------------------------------------------

    def infer_one(self, observation: Observation, rtc: RTCRequest | None = None) -> dict[str, Any]:
        """One lock-step round trip on the first connection; the server's reply plus ``round_trip_ms``.

        ``rtc`` asks a flywheel server to inpaint toward the chunk being executed (the reply's ``rtc`` says
        whether it did; other servers ignore it). A connection the server closed gracefully (restart, 1001)
        is re-opened and the request sent again; an error frame, a 1011/1009 close or a timeout raises
        :class:`ServerError`.
        """
        return self._request(self._channels[0], observation, rtc)

    def _request(
        self, channel: _Channel, observation: Observation, rtc: RTCRequest | None = None
    ) -> dict[str, Any]:
        wire = observation_to_wire(observation, self.keys, self.send_privileged)
        if rtc is not None:
            wire[RTC_FIELD] = rtc.to_wire()
        reply = channel.request(msgpack_numpy.packb(wire))
        if "policy_version" in reply:
            self.version = str(reply["policy_version"])
        return reply

    def _infer_spread(
        self, observations: list[Observation], requests: list[RTCRequest | None]
    ) -> list[dict[str, Any]]:
        """Observation ``i`` goes over connection ``i mod N``; each connection stays lock-step."""
        assert self._pool is not None
        count = len(self._channels)

        def run(lane: int) -> list[dict[str, Any]]:
            lane_items = zip(observations[lane::count], requests[lane::count], strict=True)
            return [self._request(self._channels[lane], obs, rtc) for obs, rtc in lane_items]

        lanes = list(self._pool.map(run, range(min(count, len(observations)))))
        return [lanes[index % count][index // count] for index in range(len(observations))]

    def _actions(self, reply: dict[str, Any]) -> np.ndarray:
        actions = np.asarray(reply["actions"], dtype=np.float32)
        if actions.ndim != 2 or actions.shape[0] < self.action_horizon or actions.shape[1] != self.action_dim:
            raise ServerError(
                f"actions: shape {actions.shape}, expected ({self.action_horizon}, {self.action_dim})"
            )
        return actions[: self.action_horizon]

    # ---- connection --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections (the next ``infer`` reconnects)."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> OpenPIClientPolicy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _unbatch(batch: ObservationBatch) -> list[Observation]:
    observations = []
    for index in range(batch_size(batch)):
        observation = Observation(
            images={camera: images[index] for camera, images in batch["images"].items()},
            state=batch["state"][index],
            prompt=batch["prompt"][index],
        )
        if "privileged" in batch:
            observation["privileged"] = batch["privileged"][index]
        observations.append(observation)
    return observations


def _rtc_requests(inpainting: InpaintingTargets | None, rows: int) -> list[RTCRequest | None]:
    """One ``rtc`` field per row (None for rows whose weights are all zero: plain sampling)."""
    if inpainting is None:
        return [None] * rows
    if len(inpainting.actions) != rows:
        raise ValueError(f"inpainting: {len(inpainting.actions)} rows for a batch of {rows}")
    return [
        RTCRequest(actions, weights=weights) if weights.any() else None
        for actions, weights in zip(inpainting.actions, inpainting.weights, strict=True)
    ]


def _chunk_size(metadata: dict[str, Any], name: str, given: int | None) -> int:
    """``given`` if set, else the server's value; a given horizon may be shorter than the server's, a given
    dim must equal it."""
    served = metadata.get(name)
    if given is None:
        if served is None:
            raise MissingMetadataError(name)
        return int(served)
    if given < 1:
        raise ValueError(f"{name} must be ≥ 1, got {given}")
    fits = served is None or (given <= int(served) if name == "action_horizon" else given == int(served))
    if not fits:
        raise ServerError(f"{name}={given} does not fit the server's {name} {served}")
    return given


def _describe_close(closed: ConnectionClosed, sent_bytes: int) -> str:
    if closed.rcvd is None:
        return f"connection lost: {closed}"
    if closed.rcvd.code == CloseCode.MESSAGE_TOO_BIG:
        return f"server refused a {sent_bytes}-byte message as too big (close 1009: {closed.rcvd.reason})"
    return f"server closed the connection: {closed.rcvd.code} {closed.rcvd.reason}"
