"""Small file helpers shared by every module that writes results: atomic writes, JSON conversion, JSON reads.

Why atomic: scripts resume after being killed and treat an existing output file as "done", so a file must either
be absent or complete. Every writer here writes a temporary file next to the target (same directory, so the final
``os.replace`` is an atomic rename on one filesystem), fsyncs it (so a power loss after the rename cannot leave an
empty file under the final name) and only then renames it. A failed write removes the temporary and leaves any
earlier file untouched.

Temporary names are ``.<name>.<random>.tmp``: hidden and never ending in ``.json``/``.npz``, so readers that glob
``*.json`` or ``*.npz`` never see a half-written file.

File permissions: by default the result has the mode a plain ``open(path, "w")`` would give (``0o666`` minus the
umask); pass ``mode`` to force one (the demo writer uses ``0o644``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import numpy as np

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: PathLike, *, mode: int | None = None, fsync: bool = True) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to ``path``; on a clean exit it is fsynced and renamed onto ``path``.

    For writers that need a file name (safetensors, savefig). On an exception, or when the body wrote nothing,
    the temporary is removed and ``path`` keeps its previous content.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic write of {path}: nothing was written to the temporary file {tmp}")
        if mode is not None:
            os.chmod(tmp, mode)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: PathLike, data: bytes, *, mode: int | None = None, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` all at once (see the module docstring)."""
    with atomic_path(path, mode=mode, fsync=fsync) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)


def write_text_atomic(path: PathLike, text: str, *, mode: int | None = None, fsync: bool = True) -> None:
    """Replace ``path`` with ``text`` (UTF-8) all at once."""
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode, fsync=fsync)


def write_json_atomic(path: PathLike, obj: Any, *, indent: int | None = 1,
                      default: Callable[[Any], Any] | None = None, mode: int | None = None,
                      fsync: bool = True) -> None:
    """Write ``obj`` as strict JSON and replace ``path`` with it all at once.

    The one JSON policy of the project: every JSON file goes through here, so numpy values become plain numbers and
    lists and NaN/inf become ``null`` ("undefined") in every file alike (:func:`jsonable`); ``default`` converts
    other objects (e.g. ``repr``). The text is serialised before any file is touched, so a failure writes nothing.
    """
    text = json.dumps(jsonable(obj, default=default), indent=indent)
    write_text_atomic(path, text, mode=mode, fsync=fsync)


def save_npz_atomic(path: PathLike, arrays: Mapping[str, np.ndarray], *, compress: bool = True,
                    mode: int | None = None, fsync: bool = True) -> None:
    """``np.savez[_compressed]`` to ``path`` all at once (through a file object, so no ``.npz`` is appended)."""
    save = np.savez_compressed if compress else np.savez
    with atomic_path(path, mode=mode, fsync=fsync) as tmp:
        with open(tmp, "xb") as f:
            save(f, **arrays)


# ----------------------------------------------------------------------------------------------- JSON values


def finite_float(x: Any) -> float | None:
    """``float(x)``, or None for NaN/inf: strict JSON has no non-finite numbers, and null reads as 'undefined'."""
    x = float(x)
    return x if math.isfinite(x) else None


def finite_floats(a: Any) -> Any:
    """Array-like -> nested lists of :func:`finite_float` values (a 0-d input gives one value)."""
    a = np.asarray(a, np.float64)
    if a.ndim == 0:
        return finite_float(a)
    return [finite_floats(v) for v in a]


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` hook: numpy arrays -> lists, numpy scalars -> Python, paths -> str."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, pathlib.PurePath):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _key(k: Any) -> str:
    if k is None or isinstance(k, (bool, np.bool_)):
        return json.dumps(None if k is None else bool(k))
    return str(k)


def jsonable(obj: Any, *, nonfinite: Literal["null", "keep"] = "null",
             default: Callable[[Any], Any] | None = None) -> Any:
    """Plain-Python copy of ``obj`` that ``json.dumps`` accepts, so results can be compared with what was read back.

    Mappings -> dicts with string keys, tuples/lists/arrays -> lists, numpy scalars -> bool/int/float, paths -> str.
    ``nonfinite="null"`` turns NaN/inf into None (strict JSON); ``"keep"`` keeps them as floats. Any other object
    goes through ``default`` (e.g. ``repr``) when given, else raises TypeError naming its type.
    """

    def conv(o: Any) -> Any:
        if o is None or isinstance(o, str):
            return o if o is None else str.__str__(o)
        if isinstance(o, Mapping):
            return {_key(k): conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, np.ndarray):
            return conv(o.tolist())
        if isinstance(o, (bool, np.bool_)):
            return bool(o)
        if isinstance(o, (int, np.integer)):
            return int(o)
        if isinstance(o, (float, np.floating)):
            f = float(o)
            return f if nonfinite == "keep" or math.isfinite(f) else None
        if isinstance(o, pathlib.PurePath):
            return str(o)
        if isinstance(o, np.generic):
            return conv(o.item())
        if default is not None:
            return conv(default(o))
        raise TypeError(f"not JSON serialisable: {type(o).__name__} ({o!r:.80})")

    if nonfinite not in ("null", "keep"):
        raise ValueError(f"nonfinite must be 'null' or 'keep', got {nonfinite!r}")
    return conv(obj)


# ----------------------------------------------------------------------------------------------- JSON reads


def read_json(path: PathLike, what: str = "JSON file", *, error: type[Exception] | None = None,
              hint: str = "") -> Any:
    """Parse a JSON file; a missing or unparsable file raises an error that names ``what`` and the path.

    By default a missing file raises FileNotFoundError and bad JSON (or non-UTF-8 bytes) ValueError; modules with
    their own error type (e.g. StoreError) pass it as ``error`` and get it for both. ``hint`` (what the user
    should do about a damaged file) is appended to the bad-JSON message.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise (error or FileNotFoundError)(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise (error or ValueError)(f"{what} {path} is damaged (not valid JSON: {err})"
                                    + (f"; {hint}" if hint else "")) from err
