"""A :class:`~policies.base.Policy` served by any openpi-compatible WebSocket server.

Talks openpi's protocol (metadata frame on connect, then lock-step msgpack-numpy request/response) to
flywheel's own ``flywheel serve`` or to a real openpi π0/π0.5 server on a GPU machine. Field names are mapped
with :class:`~policies.serving.ObservationKeys` (``None`` = flywheel's nested observation); a batch is sent
one observation at a time, as openpi servers take single observations.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from policies.base import ActionChunk, Observation, ObservationBatch, batch_size
from policies.serving import msgpack_numpy
from policies.serving.observations import ObservationKeys, observation_to_wire

logger = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The policy server answered with an error frame, closed the connection, or did not answer in time."""


class AuthenticationError(ServerError):
    """The server refused the connection's API key (HTTP 401 in the handshake)."""


class OpenPIClientPolicy:
    """A remote policy: ``infer`` sends each observation of the batch and stacks the returned chunks.

    ``version``, ``action_horizon`` and ``action_dim`` come from the server's metadata frame (flywheel
    servers send them); a server that does not (openpi's usually send ``{}``) needs them passed in. A longer
    chunk than ``action_horizon`` is cut to it. ``version`` follows ``policy_version`` in every reply, so
    after a server-side hot swap it names the weights that produced the last chunk. ``send_privileged``
    sends the simulator's full state (simulated robots and scripted experts only).
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
    ) -> None:
        self.url = url if url.startswith("ws") else f"ws://{url}"
        self.keys = keys
        self.send_privileged = send_privileged
        self._api_key = api_key
        self._connect_timeout_s = connect_timeout_s
        self._retry_interval_s = retry_interval_s
        self._request_timeout_s = request_timeout_s
        self._max_message_bytes = max_message_bytes
        self._connection: ClientConnection | None = None
        self.metadata: dict[str, Any] = self._connect()
        self.version: str = str(self.metadata.get("policy_version") or version or f"openpi@{self.url}")
        self.action_horizon: int = _required(self.metadata, "action_horizon", action_horizon)
        self.action_dim: int = _required(self.metadata, "action_dim", action_dim)

    # ---- Policy protocol ---------------------------------------------------------------------------------

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        """Send each observation in turn (lock-step) and stack the chunks into ``B×H×D``."""
        replies = [self.infer_one(observation) for observation in _unbatch(batch)]
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

    # ---- single requests ---------------------------------------------------------------------------------

    def infer_one(self, observation: Observation) -> dict[str, Any]:
        """One lock-step round trip; returns the server's reply dict plus ``round_trip_ms``.

        A connection the server closed gracefully (restart, 1001) is re-opened and the request sent again;
        an error frame, a 1011/1009 close or a timeout raises :class:`ServerError`.
        """
        message = msgpack_numpy.packb(observation_to_wire(observation, self.keys, self.send_privileged))
        for attempt in range(2):
            try:
                return self._round_trip(message)
            except ConnectionClosed as closed:
                self._connection = None
                code = closed.rcvd.code if closed.rcvd is not None else None
                if code in (CloseCode.INTERNAL_ERROR, CloseCode.MESSAGE_TOO_BIG) or attempt == 1:
                    raise ServerError(_describe_close(closed, len(message))) from closed
                logger.info("policy server closed the connection (%s); reconnecting", code)
                self.metadata = self._connect()
        raise AssertionError("unreachable")

    def _round_trip(self, message: bytes) -> dict[str, Any]:
        if self._connection is None:
            self.metadata = self._connect()
        assert self._connection is not None
        started = time.monotonic()
        self._connection.send(message)
        try:
            response = self._connection.recv(timeout=self._request_timeout_s)
        except TimeoutError as error:
            self.close()  # a late reply would break lock-step
            raise ServerError(f"no reply from {self.url} within {self._request_timeout_s} s") from error
        if isinstance(response, str):
            self.close()
            raise ServerError(f"policy server error: {response}")
        reply = msgpack_numpy.unpackb(response)
        if not isinstance(reply, dict) or "actions" not in reply:
            raise ServerError(f"policy server reply has no 'actions': {type(reply).__name__}")
        reply["round_trip_ms"] = (time.monotonic() - started) * 1000
        if "policy_version" in reply:
            self.version = str(reply["policy_version"])
        return reply

    def _actions(self, reply: dict[str, Any]) -> np.ndarray:
        actions = np.asarray(reply["actions"], dtype=np.float32)
        if actions.ndim != 2 or actions.shape[0] < self.action_horizon or actions.shape[1] != self.action_dim:
            raise ServerError(
                f"actions: shape {actions.shape}, expected ({self.action_horizon}, {self.action_dim})"
            )
        return actions[: self.action_horizon]

    # ---- connection --------------------------------------------------------------------------------------

    def _connect(self) -> dict[str, Any]:
        """Connect (retrying until ``connect_timeout_s``) and return the metadata frame."""
        headers = {"Authorization": f"Api-Key {self._api_key}"} if self._api_key else None
        deadline = time.monotonic() + self._connect_timeout_s
        while True:
            try:
                connection = connect(
                    self.url,
                    additional_headers=headers,
                    max_size=self._max_message_bytes,
                    compression=None,
                    open_timeout=max(0.1, deadline - time.monotonic()),
                )
                break
            except InvalidStatus as error:
                if error.response.status_code == 401:
                    raise AuthenticationError(f"{self.url} refused the API key (HTTP 401)") from error
                last_error: Exception = error
            except (OSError, TimeoutError) as error:
                last_error = error
            if time.monotonic() + self._retry_interval_s > deadline:
                raise ServerError(
                    f"could not connect to {self.url} within {self._connect_timeout_s} s: {last_error}"
                ) from last_error
            time.sleep(self._retry_interval_s)
        metadata = msgpack_numpy.unpackb(connection.recv(timeout=self._connect_timeout_s))
        if not isinstance(metadata, dict):
            connection.close()
            raise ServerError(f"metadata frame is a {type(metadata).__name__}, expected a map")
        self._connection = connection
        return metadata

    def close(self) -> None:
        """Close the connection (the next ``infer`` reconnects)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> OpenPIClientPolicy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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


def _required(metadata: dict[str, Any], name: str, given: int | None) -> int:
    value = metadata.get(name, given)
    if value is None:
        raise ServerError(f"server metadata has no {name!r}; pass {name}= to OpenPIClientPolicy")
    return int(value)


def _describe_close(closed: ConnectionClosed, sent_bytes: int) -> str:
    if closed.rcvd is None:
        return f"connection lost: {closed}"
    if closed.rcvd.code == CloseCode.MESSAGE_TOO_BIG:
        return f"server refused a {sent_bytes}-byte message as too big (close 1009: {closed.rcvd.reason})"
    return f"server closed the connection: {closed.rcvd.code} {closed.rcvd.reason}"
