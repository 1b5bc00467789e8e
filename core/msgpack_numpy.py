"""The one msgpack codec with numpy arrays: the policy wire and the episode bytes (spool, journal, ingest).

Byte-compatible with openpi's ``openpi_client.msgpack_numpy``.

An array travels as the map
``{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": shape}`` and a numpy scalar as
``{b"__npgeneric__": True, b"data": item, b"dtype": dtype.str}``, with msgpack's defaults
(``use_bin_type=True``), exactly as openpi packs them, so openpi clients and servers read what flywheel writes
and the other way round. Unlike pickle-based codecs it never executes anything: object, void and complex
dtypes are refused in both directions, and malformed maps raise :class:`WireFormatError`, not a numpy error.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = ("V", "O", "c")
_ARRAY_MAP_KEYS = frozenset({b"__ndarray__", b"data", b"dtype", b"shape"})
#: What msgpack's errors that carry no message mean.
_UNEXPLAINED: dict[type[Exception], str] = {
    msgpack.FormatError: "a type byte that starts no msgpack value (e.g. the reserved 0xc1)",
    msgpack.StackError: "arrays or maps nested deeper than the decoder allows",
}


class WireFormatError(ValueError):
    """A message is not valid msgpack-numpy (bad msgpack, bad array map, refused dtype).

    ``part`` names what of an array map was wrong (``"dtype"``, ``"shape"`` or ``"data"``), or is None.
    """

    def __init__(self, message: str, part: str | None = None) -> None:
        super().__init__(message)
        self.part = part


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in _REFUSED_KINDS:
        raise WireFormatError(
            f"dtype {dtype.str!r} is not allowed on the wire (object, void and complex dtypes are refused)",
            "dtype",
        )


def pack_array(obj: Any) -> Any:
    """msgpack ``default`` hook: turn numpy arrays and scalars into openpi's tagged maps."""
    if isinstance(obj, np.ndarray | np.generic):
        _check_dtype(obj.dtype)
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialize {type(obj).__name__} with msgpack-numpy")


def unpack_array(obj: dict) -> Any:
    """msgpack ``object_hook``: turn openpi's tagged maps back into numpy arrays and scalars."""
    if b"__ndarray__" in obj:
        return array_from_parts(obj.get(b"dtype"), obj.get(b"shape"), obj.get(b"data"))
    if b"__npgeneric__" in obj:
        return _unpack_generic(obj)
    return obj


def is_array_map(obj: Any) -> bool:
    """Whether ``obj`` (as plain msgpack decodes it) is exactly one tagged array map."""
    return isinstance(obj, dict) and set(obj) == _ARRAY_MAP_KEYS and obj[b"__ndarray__"] is True


def _parse_dtype(value: Any) -> np.dtype:
    try:
        if value is None:  # np.dtype(None) would be float64
            raise TypeError("no dtype")
        dtype = np.dtype(value)
    except (TypeError, ValueError) as error:
        raise WireFormatError(f"array map has no valid dtype: {value!r}", "dtype") from error
    _check_dtype(dtype)
    return dtype


def array_from_parts(dtype: Any, shape: Any, data: Any) -> np.ndarray:
    """The (read-only) array an array map's dtype string, shape and raw bytes describe, every part checked.

    Raises :class:`WireFormatError` (with ``part`` set) on a refused or invalid dtype, a shape that is not a
    list of non-negative ints, or data that is not bytes of exactly the needed length.
    """
    dtype = _parse_dtype(dtype)
    if not isinstance(data, bytes):
        raise WireFormatError(f"array map data must be bytes, got {type(data).__name__}", "data")
    if not isinstance(shape, list | tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise WireFormatError(f"array map shape must be a list of non-negative ints, got {shape!r}", "shape")
    expected = dtype.itemsize * math.prod(shape)
    if len(data) != expected:
        raise WireFormatError(
            f"array map holds {len(data)} bytes, shape {list(shape)} of {dtype} needs {expected}", "data"
        )
    return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))


def _unpack_generic(obj: dict) -> np.generic:
    dtype = _parse_dtype(obj.get(b"dtype"))
    try:
        return dtype.type(obj[b"data"])
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise WireFormatError(f"scalar map holds no valid {dtype} value") from error


def packb(obj: Any) -> bytes:
    """Serialize ``obj`` (dicts, lists, str, numbers, numpy arrays and scalars) to msgpack bytes."""
    return msgpack.packb(obj, default=pack_array)


def unpackb(data: bytes) -> Any:
    """Deserialize msgpack bytes, restoring numpy arrays.

    Raises :class:`WireFormatError` on any malformation (never a bare msgpack or numpy error).
    """
    try:
        return msgpack.unpackb(data, object_hook=unpack_array)
    except WireFormatError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        detail = str(error) or _UNEXPLAINED.get(type(error), "malformed input")
        raise WireFormatError(
            f"message is not valid msgpack: {error.__class__.__name__}: {detail}"
        ) from error


Packer = functools.partial(msgpack.Packer, default=pack_array)
Unpacker = functools.partial(msgpack.Unpacker, object_hook=unpack_array)
