"""Serving policies over openpi's WebSocket protocol: msgpack-numpy codec, observation checks, server."""

from policies.serving.inpainting import RTCRequest
from policies.serving.msgpack_numpy import WireFormatError, packb, unpackb
from policies.serving.observations import (
    ObservationError,
    ObservationKeys,
    ObservationSpec,
    observation_from_wire,
    observation_to_wire,
)
from policies.serving.server import (
    BackgroundServer,
    InferenceError,
    PolicyServer,
    ServerConfig,
    ServerStartError,
)

__all__ = [
    "BackgroundServer",
    "InferenceError",
    "ObservationError",
    "ObservationKeys",
    "ObservationSpec",
    "PolicyServer",
    "RTCRequest",
    "ServerConfig",
    "ServerStartError",
    "WireFormatError",
    "observation_from_wire",
    "observation_to_wire",
    "packb",
    "unpackb",
]
