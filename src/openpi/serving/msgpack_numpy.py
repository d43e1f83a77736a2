"""msgpack with numpy arrays and numpy scalars, in openpi's wire encoding.

Why our own module: the server must exchange bytes with the official ``openpi-client`` package, which cannot be
installed next to vla-interp (it pins numpy<2). Packing the same Python object here and with
``openpi_client.msgpack_numpy.packb`` gives identical bytes (tests/test_openpi_client_compat.py checks this).

Encoding (msgpack maps whose keys are msgpack *bin* values, i.e. Python ``bytes``):

* ``np.ndarray`` -> ``{b"__ndarray__": True, b"data": <raw C-order bytes>, b"dtype": dtype.str, b"shape": [..]}``
* numpy scalar  -> ``{b"__npgeneric__": True, b"data": scalar.item(), b"dtype": dtype.str}``

``dtype.str`` is numpy's byte-order-qualified code (``"<f4"``, ``"|u1"``, ``"<U5"``). Object (``O``), void/structured
(``V``) and complex (``c``) dtypes are refused in both directions with :class:`UnsupportedDtypeError`.

Quirks inherited from msgpack and kept for wire compatibility:

* ``np.float64`` and ``np.str_`` scalars subclass Python ``float``/``str``; msgpack packs them natively, so they
  arrive as plain ``float``/``str``. Every other numpy scalar (``np.float32``, ``np.int64``, ``np.bool_``...) round
  trips with its numpy type.
* Tuples arrive as lists. Decoded arrays are zero-copy, **read-only** views of the received message.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "UnsupportedDtypeError",
    "MalformedMessageError",
    "Packer",
    "Unpacker",
    "packb",
    "unpackb",
    "encode_numpy",
    "decode_numpy",
]

_NDARRAY = b"__ndarray__"
_NPGENERIC = b"__npgeneric__"
_REFUSED_KINDS = {"O": "object", "V": "void/structured", "c": "complex"}


class UnsupportedDtypeError(ValueError):
    """A numpy dtype that openpi's wire format cannot carry (object, void/structured or complex)."""


class MalformedMessageError(ValueError):
    """Bytes that are not a valid openpi msgpack message (corrupt msgpack or a broken numpy map)."""


def _check_dtype(dtype: np.dtype, what: str) -> None:
    name = _REFUSED_KINDS.get(dtype.kind)
    if name is not None:
        raise UnsupportedDtypeError(
            f"cannot serialise {what} with {name} dtype {dtype.str!r} ({dtype}): the openpi wire format refuses "
            "object, void/structured and complex dtypes; convert to a numeric, bool or string dtype first"
        )


def encode_numpy(obj: Any) -> Any:
    """msgpack ``default`` hook: turn numpy arrays/scalars into openpi's tagged maps."""
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype, f"array of shape {obj.shape}")
        # tobytes() always emits C order, also for Fortran-ordered or strided views.
        return {_NDARRAY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype, "numpy scalar")
        return {_NPGENERIC: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialise object of type {type(obj).__module__}.{type(obj).__qualname__} with msgpack")


def _parse_dtype(raw: Any, what: str) -> np.dtype:
    try:
        dtype = np.dtype(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError) as exc:
        raise MalformedMessageError(f"malformed {what}: dtype {raw!r} is not a numpy dtype ({exc})") from None
    _check_dtype(dtype, what)
    return dtype


def decode_numpy(obj: dict) -> Any:
    """msgpack ``object_hook``: turn openpi's tagged maps back into numpy arrays/scalars; other maps pass through."""
    if _NDARRAY in obj:
        missing = [k.decode() for k in (b"data", b"dtype", b"shape") if k not in obj]
        if missing:
            raise MalformedMessageError(
                f"malformed __ndarray__ map: missing field(s) {missing}; found {sorted(map(repr, obj))}"
            )
        dtype = _parse_dtype(obj[b"dtype"], "__ndarray__ map")
        raw_shape = obj[b"shape"]
        if not isinstance(raw_shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw_shape
        ):
            raise MalformedMessageError(
                f"malformed __ndarray__ map: shape must be a list of non-negative ints, got {raw_shape!r}"
            )
        shape = tuple(raw_shape)
        data = obj[b"data"]
        if not isinstance(data, (bytes, bytearray)):
            raise MalformedMessageError(f"malformed __ndarray__ map: data must be bytes, got {type(data).__name__}")
        expected = dtype.itemsize * math.prod(shape)
        if len(data) != expected:
            raise MalformedMessageError(
                f"malformed __ndarray__ map: shape {shape} with dtype {dtype.str!r} needs {expected} bytes, "
                f"data has {len(data)}"
            )
        return np.ndarray(buffer=data, dtype=dtype, shape=shape)
    if _NPGENERIC in obj:
        missing = [k.decode() for k in (b"data", b"dtype") if k not in obj]
        if missing:
            raise MalformedMessageError(f"malformed __npgeneric__ map: missing field(s) {missing}")
        dtype = _parse_dtype(obj[b"dtype"], "__npgeneric__ map")
        try:
            return dtype.type(obj[b"data"])
        except (TypeError, ValueError, OverflowError) as exc:
            raise MalformedMessageError(
                f"malformed __npgeneric__ map: {obj[b'data']!r} is not a valid {dtype}: {exc}"
            ) from None
    return obj


def _find_unpackable(obj: Any, path: str = "") -> str | None:
    """Path (``a/b[2]``) and reason of the first leaf that ``packb`` cannot encode; None if all are fine."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found = _find_unpackable(value, f"{path}/{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = _find_unpackable(value, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(obj, (np.ndarray, np.generic)):
        return f"{path or '<root>'} ({obj.dtype})" if obj.dtype.kind in _REFUSED_KINDS else None
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, bytearray)):
        return None
    return f"{path or '<root>'} ({type(obj).__qualname__})"


class Packer(msgpack.Packer):
    """Reusable packer (one per connection or client) with the numpy hook installed."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("default", encode_numpy)
        super().__init__(**kwargs)


Unpacker = functools.partial(msgpack.Unpacker, object_hook=decode_numpy)


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (dicts, lists, scalars, str/bytes, numpy arrays/scalars); errors name the offending key."""
    try:
        return msgpack.packb(obj, default=encode_numpy)
    except (TypeError, ValueError) as exc:
        where = _find_unpackable(obj)
        if where is None:
            raise
        raise type(exc)(f"{exc} [at {where}]") from exc


def unpackb(data: bytes | bytearray | memoryview) -> Any:
    """Decode one message; invalid input raises ``MalformedMessageError`` or ``UnsupportedDtypeError`` (ValueErrors)."""
    try:
        return msgpack.unpackb(data, object_hook=decode_numpy)
    except (UnsupportedDtypeError, MalformedMessageError):
        raise
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise MalformedMessageError(
            f"could not decode {len(data)}-byte message as msgpack: {type(exc).__name__}: {exc}"
        ) from exc
