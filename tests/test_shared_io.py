"""openpi.shared.io: atomic writes keep old files on failure, JSON conversion conventions, clear read errors."""
import enum
import json
import os
import pathlib

import numpy as np
import pytest

from openpi.shared import io


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_json_round_trip_with_numpy_values(tmp_path):
    obj = {"a": np.float32(1.5), "b": np.arange(3), "c": (np.int64(4), np.bool_(True)), "d": np.nan,
           "e": [np.inf, -np.inf, 2.0], "f": pathlib.Path("x/y"), 7: "int key", "g": np.array([[1.0, np.nan]])}
    io.write_json_atomic(tmp_path / "o.json", io.jsonable(obj), indent=1)
    back = json.loads((tmp_path / "o.json").read_text())
    assert back == {"a": 1.5, "b": [0, 1, 2], "c": [4, True], "d": None, "e": [None, None, 2.0], "f": "x/y",
                    "7": "int key", "g": [[1.0, None]]}
    assert type(back["b"][0]) is int and type(back["c"][1]) is bool
    # indent=1 is the layout the result files use
    assert (tmp_path / "o.json").read_text().startswith('{\n "a": 1.5,')


def test_jsonable_keep_nonfinite_and_default():
    class Color(enum.Enum):
        RED = 1

    class Name(str, enum.Enum):
        A = "a"

    out = io.jsonable({"x": np.float64(np.nan), "c": Color.RED, "n": Name.A, None: 1, True: 2}, nonfinite="keep",
                      default=repr)
    assert np.isnan(out["x"]) and out["c"] == "<Color.RED: 1>" and out["n"] == "a" and type(out["n"]) is str
    assert out["null"] == 1 and out["true"] == 2  # the key spelling json.dumps uses
    with pytest.raises(TypeError, match="object"):
        io.jsonable({"o": object()})
    with pytest.raises(ValueError, match="nonfinite"):
        io.jsonable(1.0, nonfinite="drop")


def test_finite_floats_and_json_default():
    assert io.finite_float(np.float32(2.5)) == 2.5 and io.finite_float(np.nan) is None and io.finite_float(-np.inf) is None
    assert io.finite_floats(np.array([[1, 2], [np.nan, 3]])) == [[1.0, 2.0], [None, 3.0]]
    assert io.finite_floats(np.float64(np.inf)) is None
    text = json.dumps({"a": np.arange(2), "b": np.float32(0.5), "p": pathlib.Path("q"), "n": np.nan},
                      default=io.json_default)
    assert text == '{"a": [0, 1], "b": 0.5, "p": "q", "n": NaN}'
    with pytest.raises(TypeError, match="set"):
        json.dumps({1, 2}, default=io.json_default)


def test_one_json_policy_nan_becomes_null_and_failures_keep_previous_file(tmp_path):
    path = tmp_path / "r.json"
    io.write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError, match="set"):
        io.write_json_atomic(path, {"bad": {1, 2}})  # not serialisable: nothing written
    assert json.loads(path.read_text()) == {"ok": 1}
    io.write_json_atomic(path, {"nan": float("nan"), "inf": np.float32(np.inf), "a": np.array([1.0, np.nan])},
                         indent=None)
    assert path.read_text() == '{"nan": null, "inf": null, "a": [1.0, null]}'  # strict JSON, every file alike
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporaries left behind


def test_failed_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "sub" / "f.npz"  # parent directories are created
    io.save_npz_atomic(path, {"x": np.arange(4)})
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    with np.load(path) as z:
        np.testing.assert_array_equal(z["x"], np.arange(4))
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with io.atomic_path(path):
            pass
    with pytest.raises(TypeError):  # an unserialisable object fails before the file is touched
        io.write_json_atomic(path.with_name("g.json"), {"o": object()})
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.npz"]


def test_npz_compress_flag_and_text(tmp_path):
    big = {"z": np.zeros(10000, np.float32)}
    io.save_npz_atomic(tmp_path / "c.npz", big, compress=True)
    io.save_npz_atomic(tmp_path / "u.npz", big, compress=False)
    assert (tmp_path / "c.npz").stat().st_size < (tmp_path / "u.npz").stat().st_size / 10
    io.write_text_atomic(tmp_path / "t.html", "h\u00e9")
    assert (tmp_path / "t.html").read_bytes() == "h\u00e9".encode("utf-8")
    io.write_text_atomic(tmp_path / "t.html", "second")
    assert (tmp_path / "t.html").read_text() == "second"


def test_file_mode_default_follows_umask_and_can_be_forced(tmp_path):
    io.write_text_atomic(tmp_path / "a.txt", "a")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~_umask()
    io.write_json_atomic(tmp_path / "b.json", {}, mode=0o640)
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640


def test_read_json_errors_name_the_file(tmp_path):
    good = tmp_path / "g.json"
    good.write_text('{"k": [1, 2]}')
    assert io.read_json(good) == {"k": [1, 2]}
    with pytest.raises(FileNotFoundError, match=r"span table .*nope\.json is missing"):
        io.read_json(tmp_path / "nope.json", "span table")
    bad = tmp_path / "bad.json"
    bad.write_text('{"k": ')
    with pytest.raises(ValueError, match=r"config .*bad\.json is damaged \(not valid JSON"):
        io.read_json(bad, "config")
    with pytest.raises(ValueError, match=r"damaged .*; move it away$"):
        io.read_json(bad, "record", hint="move it away")
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="bad.json"):
        io.read_json(bad)

    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match="nope.json"):
        io.read_json(tmp_path / "nope.json", error=MyError)
    with pytest.raises(MyError, match="damaged"):
        io.read_json(bad, error=MyError)
