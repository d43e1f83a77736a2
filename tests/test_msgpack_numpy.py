"""openpi wire encoding of numpy data: exact map layout, round trips, refused dtypes, corrupt input."""

import msgpack
import numpy as np
import pytest

from openpi.serving import msgpack_numpy as mn


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(12, dtype=np.uint8).reshape(4, 3),
        np.array([True, False, True]),
        np.arange(6, dtype=np.int64) - 3,
        np.linspace(-1, 1, 5).astype(np.float16),
        np.arange(4, dtype=">f4"),  # big-endian keeps its byte order
        np.array(["ab", "xyz"]),  # unicode '<U3'
        np.array(3.5, dtype=np.float64),  # 0-d
        np.zeros((0, 7), dtype=np.float32),  # empty
    ],
    ids=lambda a: f"{a.dtype.str}{a.shape}",
)
def test_array_round_trip_keeps_dtype_shape_values(array):
    out = mn.unpackb(mn.packb({"x": array}))["x"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == array.dtype and out.dtype.str == array.dtype.str
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_non_contiguous_arrays_are_sent_in_c_order():
    base = np.arange(30, dtype=np.int32).reshape(5, 6)
    for view in (base.T, base[::2, 1::2], np.asfortranarray(base)):
        raw = msgpack.unpackb(mn.packb(view))
        assert raw[b"data"] == np.ascontiguousarray(view).tobytes()
        np.testing.assert_array_equal(mn.unpackb(mn.packb(view)), view)


def test_wire_layout_matches_openpi():
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    raw = msgpack.unpackb(mn.packb({"observation/image": image, "s": np.float32(1.5)}))
    arr = raw["observation/image"]
    assert set(arr) == {b"__ndarray__", b"data", b"dtype", b"shape"}
    assert arr[b"__ndarray__"] is True
    assert arr[b"dtype"] == "|u1"
    assert arr[b"shape"] == [2, 2, 3]
    assert arr[b"data"] == image.tobytes()
    assert raw["s"] == {b"__npgeneric__": True, b"data": 1.5, b"dtype": "<f4"}


def test_decodes_hand_built_openpi_maps():
    values = np.array([[1.0, -2.0], [3.25, 4.0]], dtype="<f8")
    message = msgpack.packb(
        {
            "actions": {b"__ndarray__": True, b"data": values.tobytes(), b"dtype": "<f8", b"shape": [2, 2]},
            "k": {b"__npgeneric__": True, b"data": 7, b"dtype": "<i2"},
        }
    )
    out = mn.unpackb(message)
    np.testing.assert_array_equal(out["actions"], values)
    assert type(out["k"]) is np.int16 and out["k"] == 7


@pytest.mark.parametrize(
    ("scalar", "expected_type"),
    [
        (np.float32(0.25), np.float32),
        (np.int64(-5), np.int64),
        (np.uint8(200), np.uint8),
        (np.bool_(True), np.bool_),
        (np.int32(7), np.int32),
        # np.float64 subclasses float, so msgpack packs it natively (as openpi's encoder does).
        (np.float64(2.5), float),
    ],
    ids=lambda v: type(v).__name__,
)
def test_numpy_scalar_round_trip(scalar, expected_type):
    out = mn.unpackb(mn.packb([scalar]))[0]
    assert type(out) is expected_type
    assert out == scalar


def test_nested_containers_and_plain_values_round_trip():
    obj = {
        "prompt": "pick up the bowl",
        "meta/run_id": "run-7",
        "meta/episode": 3,
        "nested": {"a": [1, 2.5, None, True], "arr": [np.ones(2, np.float32), np.zeros((1, 1), np.int8)]},
        "raw": b"\x00\x01",
    }
    out = mn.unpackb(mn.packb(obj))
    assert out["prompt"] == "pick up the bowl" and out["meta/run_id"] == "run-7" and out["meta/episode"] == 3
    assert out["nested"]["a"] == [1, 2.5, None, True]
    np.testing.assert_array_equal(out["nested"]["arr"][0], np.ones(2, np.float32))
    assert out["nested"]["arr"][1].dtype == np.int8
    assert out["raw"] == b"\x00\x01"


def test_packer_class_matches_packb():
    obj = {"a": np.arange(5, dtype=np.float32), "b": np.int16(3)}
    assert mn.Packer().pack(obj) == mn.packb(obj)
    unpacker = mn.Unpacker()
    unpacker.feed(mn.packb(obj))
    (out,) = list(unpacker)
    np.testing.assert_array_equal(out["a"], obj["a"])


@pytest.mark.parametrize(
    ("value", "kind_word"),
    [
        (np.array([1, "a"], dtype=object), "object"),
        (np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]), "void/structured"),
        (np.zeros(3, dtype=np.complex64), "complex"),
        (np.complex128(1 + 2j), "complex"),
        (np.void(b"\x00\x01"), "void/structured"),
    ],
    ids=["object", "structured", "complex-array", "complex-scalar", "void-scalar"],
)
def test_refuses_object_void_complex_and_names_the_key(value, kind_word):
    with pytest.raises(mn.UnsupportedDtypeError) as info:
        mn.packb({"ok": np.ones(2), "obs": {"bad": value}})
    message = str(info.value)
    assert kind_word in message
    assert "obs/bad" in message


def test_refuses_complex_and_object_dtypes_on_decode():
    for dtype in ("<c8", "|O"):
        message = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": dtype, b"shape": [1]})
        with pytest.raises(mn.UnsupportedDtypeError, match="dtype"):
            mn.unpackb(message)


def test_unserialisable_python_object_is_a_type_error_naming_the_key():
    with pytest.raises(TypeError, match=r"cfg/fn"):
        mn.packb({"cfg": {"fn": object()}})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({b"__ndarray__": True, b"dtype": "<f4", b"shape": [2]}, r"missing field\(s\) \['data'\]"),
        ({b"__ndarray__": True, b"data": b"\x00" * 7, b"dtype": "<f4", b"shape": [2]}, "needs 8 bytes, data has 7"),
        ({b"__ndarray__": True, b"data": b"", b"dtype": "not-a-dtype", b"shape": [0]}, "not a numpy dtype"),
        ({b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [-1]}, "non-negative"),
        ({b"__npgeneric__": True, b"dtype": "<f4"}, r"missing field\(s\) \['data'\]"),
    ],
    ids=["missing-data", "short-data", "bad-dtype", "negative-shape", "generic-missing-data"],
)
def test_malformed_numpy_maps_raise_clear_errors(fields, match):
    with pytest.raises(mn.MalformedMessageError, match=match):
        mn.unpackb(msgpack.packb({"x": fields}))


def test_corrupt_bytes_raise_malformed_message_error():
    rng = np.random.default_rng(0)
    failures = 0
    for _ in range(20):
        blob = rng.integers(0, 256, size=64, dtype=np.uint8).tobytes()
        try:
            mn.unpackb(blob)
        except mn.MalformedMessageError as exc:
            assert "64-byte" in str(exc) or "malformed" in str(exc)
            failures += 1
    assert failures > 0
    with pytest.raises(mn.MalformedMessageError, match="msgpack"):
        mn.unpackb(b"\xc1")  # 0xc1 is never used by msgpack
    with pytest.raises(mn.MalformedMessageError):
        mn.unpackb(mn.packb({"a": 1})[:-1])  # truncated


def test_decoded_arrays_are_read_only_views():
    out = mn.unpackb(mn.packb(np.arange(4, dtype=np.float32)))
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0] = 1.0
