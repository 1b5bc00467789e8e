"""Serving policies over openpi's WebSocket protocol: observation checks and the server (the msgpack-numpy
codec is :mod:`core.msgpack_numpy`, re-exported here)."""

from core import msgpack_numpy
from core.msgpack_numpy import WireFormatError, packb, unpackb
from policies.serving.inpainting import RTCRequest
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
    "msgpack_numpy",
    "observation_from_wire",
    "observation_to_wire",
    "packb",
    "unpackb",
]
