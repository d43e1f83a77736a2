"""The official openpi-client package (own venv, numpy<2) against our server (this venv, numpy 2).

scripts/setup_client_env.sh creates /work/main/.venv-client with the pinned openpi-client (needs the package
index on first run). A Python snippet runs there, talks to our in-process server and prints JSON we check.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import textwrap
import threading

import numpy as np
import pytest

from openpi.serving import msgpack_numpy
from openpi.serving.websocket_server import BackgroundServer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLIENT_VENV = REPO_ROOT / ".venv-client"
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup_client_env.sh"
HORIZON = 10

# Executed both in the client venv (numpy 1.x) and here (numpy 2.x): the two sides build identical objects.
COMMON = textwrap.dedent(
    """
    import numpy as np

    def make_obs():
        image = (np.arange(224 * 224 * 3, dtype=np.int64).reshape(224, 224, 3) * 7 % 256).astype(np.uint8)
        wrist = (np.arange(224 * 224 * 3, dtype=np.int64).reshape(224, 224, 3) * 13 % 256).astype(np.uint8)
        return {
            "observation/image": image,
            "observation/wrist_image": wrist,
            "observation/state": np.linspace(-1.0, 1.0, 8).astype(np.float32),
            "prompt": "put the bowl on the plate",
            "meta/episode": np.int64(4),
            "meta/gain": np.float32(0.5),
        }

    def reference_object():
        return {
            "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
            "u8": np.arange(5, dtype=np.uint8),
            "bool": np.array([True, False]),
            "i64_fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
            "be": np.arange(3, dtype=">i4"),
            "s_i32": np.int32(-3),
            "s_bool": np.bool_(True),
            "s_f16": np.float16(1.5),
            "text": "pick",
            "nested": [1, 2.5, None, {"k": np.zeros((0, 2), np.float32)}],
        }
    """
)

CLIENT_SNIPPET = COMMON + textwrap.dedent(
    """
    import json, sys
    from openpi_client import msgpack_numpy, websocket_client_policy

    host, port = sys.argv[1], int(sys.argv[2])
    out = {"numpy": np.__version__}
    client = websocket_client_policy.WebsocketClientPolicy(host=host, port=port)
    meta = client.get_server_metadata()
    out["metadata"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items()}
    out["metadata_types"] = {k: type(v).__name__ for k, v in meta.items()}
    reply = client.infer(make_obs())
    out["actions"] = reply["actions"].tolist()
    out["actions_shape"] = list(reply["actions"].shape)
    out["actions_dtype"] = reply["actions"].dtype.str
    out["reply_keys"] = sorted(reply)
    out["server_timing_keys"] = sorted(reply["server_timing"])
    out["scalar_type"] = type(reply["scalar"]).__name__
    out["scalar"] = float(reply["scalar"])
    bad = make_obs()
    bad["observation/image"] = np.zeros((5, 5, 3), np.uint8)
    try:
        client.infer(bad)
        out["error"] = None
    except RuntimeError as exc:
        out["error"] = str(exc)
    again = websocket_client_policy.WebsocketClientPolicy(host=host, port=port)
    out["after_error_shape"] = list(again.infer(make_obs())["actions"].shape)
    out["reference_hex"] = msgpack_numpy.packb(reference_object()).hex()
    print(json.dumps(out))
    """
)


def actions_for(obs: dict) -> np.ndarray:
    image = obs["observation/image"].astype(np.float64)
    state = obs["observation/state"].astype(np.float64)
    rows = np.arange(HORIZON, dtype=np.float64)[:, None]
    return (rows * 0.1 + state[None, :7] + image.mean() / 255.0).astype(np.float32)


class LiberoShapedPolicy:
    """Checks the observation the way the real LIBERO policy does and returns a deterministic chunk."""

    metadata = {"policy": "compat-test", "action_horizon": HORIZON, "norm_mean": np.arange(3, dtype=np.float32)}

    def __init__(self) -> None:
        self.received: list[dict] = []
        self._lock = threading.Lock()

    def infer(self, obs: dict) -> dict:
        image = obs["observation/image"]
        if image.shape != (224, 224, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"observation/image has shape {image.shape} dtype {image.dtype}, expected (224, 224, 3) uint8"
            )
        with self._lock:
            self.received.append(obs)
        return {"actions": actions_for(obs), "policy_timing": {"infer_ms": 0.5}, "scalar": np.float32(0.25)}


@pytest.fixture(scope="session")
def client_python() -> pathlib.Path:
    result = subprocess.run(["bash", str(SETUP_SCRIPT), str(CLIENT_VENV)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"setup_client_env.sh failed:\n{result.stdout}\n{result.stderr}"
    return CLIENT_VENV / "bin" / "python"


def run_client(python: pathlib.Path, port: int) -> dict:
    proc = subprocess.run(
        [str(python), "-c", CLIENT_SNIPPET, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"openpi-client snippet failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_official_openpi_client_against_our_server(client_python):
    namespace: dict = {}
    exec(COMMON, namespace)  # noqa: S102 - our own snippet, shared with the client process
    make_obs, reference_object = namespace["make_obs"], namespace["reference_object"]

    policy = LiberoShapedPolicy()
    with BackgroundServer(policy) as srv:
        out = run_client(client_python, srv.port)

    assert out["numpy"].startswith("1."), "openpi-client must run with its own numpy<2"
    # Metadata: first binary message, numpy values decoded by the official client.
    assert out["metadata"] == {"policy": "compat-test", "action_horizon": HORIZON, "norm_mean": [0.0, 1.0, 2.0]}
    assert out["metadata_types"]["norm_mean"] == "ndarray"

    # Request decoded on our side exactly as the client built it.
    expected_obs = make_obs()
    received = policy.received[0]
    for key in ("observation/image", "observation/wrist_image", "observation/state"):
        assert received[key].dtype == expected_obs[key].dtype and received[key].shape == expected_obs[key].shape
        np.testing.assert_array_equal(received[key], expected_obs[key])
    assert received["prompt"] == "put the bowl on the plate"
    assert type(received["meta/episode"]) is np.int64 and received["meta/episode"] == 4
    assert type(received["meta/gain"]) is np.float32 and received["meta/gain"] == np.float32(0.5)
    assert "meta/connection_id" in received and received["meta/request_index"] == 0

    # Reply decoded by the official client.
    assert out["actions_shape"] == [HORIZON, 7] and out["actions_dtype"] == "<f4"
    np.testing.assert_array_equal(np.asarray(out["actions"], np.float32), actions_for(expected_obs))
    assert {"actions", "policy_timing", "server_timing", "scalar"} <= set(out["reply_keys"])
    assert "infer_ms" in out["server_timing_keys"]
    assert out["scalar_type"] == "float32" and out["scalar"] == 0.25

    # Error path: openpi-client raises with our text frame's message; a fresh connection works afterwards.
    assert out["error"] is not None
    assert "Error in inference server" in out["error"]
    assert "ValueError: observation/image has shape (5, 5, 3)" in out["error"]
    assert out["after_error_shape"] == [HORIZON, 7]

    # Byte-identical encoding: openpi-client (numpy 1) and our packb (numpy 2) produce the same bytes.
    assert bytes.fromhex(out["reference_hex"]) == msgpack_numpy.packb(reference_object())


FAST_SNIPPET = COMMON + textwrap.dedent(
    """
    import json, sys
    from openpi_client import websocket_client_policy

    client = websocket_client_policy.WebsocketClientPolicy(host=sys.argv[1], port=int(sys.argv[2]))
    meta = client.get_server_metadata()
    reply = client.infer(make_obs())
    print(json.dumps({"model": meta["model"], "config": meta["config"], "shape": list(reply["actions"].shape),
                      "finite": bool(np.isfinite(reply["actions"]).all()), "fast_decode": reply["fast_decode"]}))
    """
)


def test_official_openpi_client_against_a_served_pi0_fast(client_python):
    """The real Pi0-FAST policy behind our server: the official client gets a (10, 7) chunk and the decode report."""
    from openpi.policies.policy_config import create_policy

    policy = create_policy("pi0_fast_tiny_spatial")
    with BackgroundServer(policy) as srv:
        proc = subprocess.run([str(client_python), "-c", FAST_SNIPPET, "127.0.0.1", str(srv.port)],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"openpi-client snippet failed:\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model"] == "pi0_fast" and out["config"] == "pi0_fast_tiny_spatial"
    assert out["shape"] == [HORIZON, 7] and out["finite"]
    assert set(out["fast_decode"]) == {"ok", "reason", "action_tokens", "decoding_steps", "fitted"}
