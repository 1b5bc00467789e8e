"""The msgpack-numpy codec writes and reads exactly openpi's bytes, and refuses anything unsafe."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from core import msgpack_numpy
from core.msgpack_numpy import WireFormatError


def _bin(raw: bytes) -> bytes:
    """msgpack bin8: how openpi's packer (use_bin_type=True) writes Python bytes."""
    return b"\xc4" + bytes([len(raw)]) + raw


def _str(text: str) -> bytes:
    """msgpack fixstr."""
    return bytes([0xA0 | len(text)]) + text.encode()


def test_array_bytes_match_openpi_layout() -> None:
    array = np.array([1.0, 2.0], dtype=np.float32)
    expected = (
        b"\x84"  # map of 4, keys in openpi's order
        + _bin(b"__ndarray__")
        + b"\xc3"
        + _bin(b"data")
        + _bin(struct.pack("<2f", 1.0, 2.0))
        + _bin(b"dtype")
        + _str("<f4")
        + _bin(b"shape")
        + b"\x91\x02"  # [2]
    )
    assert msgpack_numpy.packb(array) == expected
    decoded = msgpack_numpy.unpackb(expected)
    assert decoded.dtype == np.float32 and decoded.shape == (2,) and decoded.tolist() == [1.0, 2.0]


def test_scalar_bytes_match_openpi_layout() -> None:
    expected = (
        b"\x83"
        + _bin(b"__npgeneric__")
        + b"\xc3"
        + _bin(b"data")
        + b"\xcb"
        + struct.pack(">d", 0.5)  # item() is a Python float, packed as float 64
        + _bin(b"dtype")
        + _str("<f4")
    )
    assert msgpack_numpy.packb(np.float32(0.5)) == expected
    decoded = msgpack_numpy.unpackb(expected)
    assert isinstance(decoded, np.float32) and decoded == 0.5


@pytest.mark.parametrize(
    "value",
    [
        np.zeros((2, 3, 4), dtype=np.uint8),
        np.array([[1.5, -2.0]], dtype=np.float64),
        np.array([True, False]),
        np.array(["asdf", "qwer"]),
        np.array(3.0),
        np.int64(7),
        {"actions": np.ones((10, 4), np.float32), "server_timing": {"infer_ms": 1.5}, "policy_version": "v1"},
    ],
)
def test_round_trip_preserves_dtype_shape_and_values(value: object) -> None:
    decoded = msgpack_numpy.unpackb(msgpack_numpy.packb(value))
    if isinstance(value, dict):
        np.testing.assert_array_equal(decoded["actions"], value["actions"])
        assert decoded["server_timing"] == value["server_timing"] and decoded["policy_version"] == "v1"
    else:
        assert decoded.dtype == value.dtype and np.shape(decoded) == np.shape(value)
        np.testing.assert_array_equal(decoded, value)


def test_decodes_what_a_plain_msgpack_openpi_peer_writes() -> None:
    """A map built by hand with msgpack (as openpi's pack_array returns it) decodes to the same array."""
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    array_map = {b"__ndarray__": True, b"data": image.tobytes(), b"dtype": "|u1", b"shape": (2, 2, 3)}
    wire = msgpack.packb({"observation/image": array_map})
    np.testing.assert_array_equal(msgpack_numpy.unpackb(wire)["observation/image"], image)


@pytest.mark.parametrize("value", [np.array([object()]), np.zeros(2, dtype="V4"), np.array([1 + 2j])])
def test_packing_refuses_object_void_and_complex(value: np.ndarray) -> None:
    with pytest.raises(WireFormatError, match="not allowed on the wire"):
        msgpack_numpy.packb(value)


@pytest.mark.parametrize(
    ("array_map", "message"),
    [
        ({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]}, "not allowed"),
        ({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|V8", b"shape": [1]}, "not allowed"),
        ({b"__ndarray__": True, b"data": b"\x00" * 7, b"dtype": "<f4", b"shape": [2]}, "needs 8"),
        ({b"__ndarray__": True, b"data": b"\x00" * 4, b"dtype": "<f4", b"shape": [-1]}, "non-negative"),
        ({b"__ndarray__": True, b"data": 5, b"dtype": "<f4", b"shape": [1]}, "must be bytes"),
        ({b"__ndarray__": True, b"data": b"", b"dtype": "nonsense", b"shape": [0]}, "no valid dtype"),
    ],
)
def test_malformed_array_maps_raise_wire_format_error(array_map: dict, message: str) -> None:
    with pytest.raises(WireFormatError, match=message):
        msgpack_numpy.unpackb(msgpack.packb(array_map))


@pytest.mark.parametrize("garbage", [b"\xc1", b"\x92\x01", b"\x85\xa1a", b"\x91" * 5000 + b"\xc0"])
def test_invalid_msgpack_raises_wire_format_error(garbage: bytes) -> None:
    with pytest.raises(WireFormatError, match="not valid msgpack"):
        msgpack_numpy.unpackb(garbage)
