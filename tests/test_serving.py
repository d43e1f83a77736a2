"""Websocket policy server + our client, in-process: protocol, errors, meta keys, health, concurrency."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import tyro
import websockets
import websockets.sync.client

from openpi.serving import msgpack_numpy
from openpi.serving.websocket_client import WebsocketClientPolicy
from openpi.serving.websocket_server import (DEFAULT_HOST, LIBERO_REQUIRED_KEYS, MAX_ERROR_CHARS, BackgroundServer,
                                             WebsocketPolicyServer)

HORIZON = 10
IMAGE_SHAPE = (32, 32, 3)
METADATA = {"policy": "echo-test", "action_horizon": HORIZON, "norm": np.arange(3, dtype=np.float32)}


def make_obs(seed: int, **extra) -> dict:
    rng = np.random.default_rng(seed)
    obs = {
        "observation/image": rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8),
        "observation/state": rng.normal(size=8).astype(np.float32),
        "prompt": f"task {seed}",
    }
    obs.update(extra)
    return obs


def expected_actions(obs: dict) -> np.ndarray:
    """The deterministic chunk EchoPolicy returns: depends on both images, the state and the row index."""
    colour = obs["observation/image"].astype(np.float64).mean(axis=(0, 1)) / 255.0
    wrist = obs["observation/wrist_image"].astype(np.float64).mean() / 255.0
    state = obs["observation/state"].astype(np.float64)
    rows = np.arange(HORIZON)[:, None] * 0.5
    return (rows + state[None, :7] + colour[np.arange(7) % 3][None, :] + wrist).astype(np.float32)


class EchoPolicy:
    """Validates a LIBERO-shaped observation like the real policy does and returns deterministic actions."""

    metadata = METADATA

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.seen_meta: list[dict] = []

    def infer(self, obs: dict) -> dict:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(0.002)  # widen the window in which an unlocked server would overlap two calls
            if "prompt" not in obs:
                raise KeyError("observation has no 'prompt' and the policy has no default prompt")
            if obs["prompt"] == "__no_actions__":
                return {"not_actions": 1}
            if obs["prompt"] == "__complex__":
                return {"actions": np.zeros((HORIZON, 7), np.complex64)}
            if obs["prompt"].startswith("__long_error__"):
                raise ValueError(f"bad prompt {obs['prompt']!r}")
            image = obs["observation/image"]
            if image.shape != IMAGE_SHAPE or image.dtype != np.uint8:
                raise ValueError(
                    f"observation/image has shape {image.shape} dtype {image.dtype}, expected {IMAGE_SHAPE} uint8"
                )
            with self._lock:
                self.seen_meta.append({k: v for k, v in obs.items() if k.startswith("meta/")})
            return {
                "actions": expected_actions(obs),
                "policy_timing": {"infer_ms": 1.0},
                "meta_echo": {k: v for k, v in obs.items() if k.startswith("meta/")},
            }
        finally:
            with self._lock:
                self.active -= 1


class GatedPolicy:
    """Blocks inside infer until the test releases it: proves the event loop stays free during inference."""

    metadata = {"policy": "gated"}

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def infer(self, obs: dict) -> dict:
        self.started.set()
        if not self.release.wait(timeout=30):
            raise RuntimeError("test never released the gated policy")
        return {"actions": np.full((HORIZON, 7), obs["x"], np.float32)}


@pytest.fixture(scope="module")
def echo_server():
    policy = EchoPolicy()
    with BackgroundServer(policy, required_keys=LIBERO_REQUIRED_KEYS) as srv:
        yield srv, policy


@contextlib.contextmanager
def raw_connect(port: int) -> Iterator[tuple[websockets.sync.client.ClientConnection, dict]]:
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        first = ws.recv(timeout=10)
        assert isinstance(first, bytes), "the first message must be binary metadata"
        yield ws, msgpack_numpy.unpackb(first)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metadata_then_actions_and_timing(echo_server):
    srv, _ = echo_server
    with WebsocketClientPolicy("127.0.0.1", srv.port, connect_timeout_s=10) as client:
        meta = client.get_server_metadata()
        assert meta["policy"] == "echo-test" and meta["action_horizon"] == HORIZON
        np.testing.assert_array_equal(meta["norm"], METADATA["norm"])
        obs = make_obs(1)
        first = client.infer(obs)
        second = client.infer(make_obs(2))
    assert first["actions"].shape == (HORIZON, 7) and first["actions"].dtype == np.float32
    np.testing.assert_array_equal(first["actions"], expected_actions(obs))
    assert first["policy_timing"] == {"infer_ms": 1.0}
    timing = first["server_timing"]
    assert {"infer_ms", "wait_ms", "decode_ms"} <= set(timing)
    assert all(isinstance(v, float) and v >= 0 for v in timing.values())
    assert "prev_total_ms" not in timing  # nothing before the first request
    assert second["server_timing"]["prev_total_ms"] > 0


def test_meta_keys_added_without_run_id_and_passed_through_with_it(echo_server):
    srv, _ = echo_server
    with WebsocketClientPolicy("127.0.0.1", srv.port) as a, WebsocketClientPolicy("127.0.0.1", srv.port) as b:
        a0 = a.infer(make_obs(3))["meta_echo"]
        a1 = a.infer(make_obs(4))["meta_echo"]
        b0 = b.infer(make_obs(5))["meta_echo"]
        client_meta = {"meta/run_id": "run-42", "meta/episode": 3, "meta/env_step": 120, "meta/suite": "libero_goal"}
        tagged = a.infer(make_obs(6, **client_meta))["meta_echo"]
        kept = a.infer(make_obs(7, **{"meta/request_index": 99}))["meta_echo"]
    assert set(a0) == {"meta/connection_id", "meta/request_index"}
    assert re.fullmatch(r"[0-9a-f]{32}", a0["meta/connection_id"])
    assert a0["meta/connection_id"] == a1["meta/connection_id"] != b0["meta/connection_id"]
    assert (a0["meta/request_index"], a1["meta/request_index"], b0["meta/request_index"]) == (0, 1, 0)
    assert tagged == client_meta  # untouched, nothing added when the client names its run
    assert kept["meta/request_index"] == 99 and kept["meta/connection_id"] == a0["meta/connection_id"]


BAD_REQUESTS = {
    "random-bytes": (b"\xc1" + np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes(),
                     "could not decode"),
    "text-frame": ("{\"observation/image\": 1}", "got a text frame"),
    "not-a-map": (msgpack_numpy.packb([1, 2, 3]), "expected the request to be a msgpack map"),
    "missing-required-keys": (msgpack_numpy.packb({"prompt": "hi"}), "missing required key(s)"),
    "policy-key-error": (msgpack_numpy.packb({k: v for k, v in make_obs(8).items() if k != "prompt"}),
                         "KeyError: observation has no 'prompt'"),
    "wrong-image-shape": (msgpack_numpy.packb(make_obs(9, **{"observation/image": np.zeros((5, 5, 3), np.uint8)})),
                          "ValueError: observation/image has shape (5, 5, 3)"),
    "broken-ndarray-map": (msgpack.packb({"observation/image": {b"__ndarray__": True, b"data": b"12",
                                                                b"dtype": "<f4", b"shape": [3]}}),
                           "needs 12 bytes, data has 2"),
    "reply-without-actions": (msgpack_numpy.packb(make_obs(10, prompt="__no_actions__")), "without 'actions'"),
    "unserialisable-reply": (msgpack_numpy.packb(make_obs(11, prompt="__complex__")), "complex"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_text_frame_and_1011_while_others_keep_working(echo_server, case, caplog):
    srv, _ = echo_server
    payload, expected_text = BAD_REQUESTS[case]
    caplog.set_level(logging.ERROR, logger="openpi.serving.websocket_server")
    bystander = WebsocketClientPolicy("127.0.0.1", srv.port)
    try:
        with raw_connect(srv.port) as (ws, _):
            ws.send(payload)
            answer = ws.recv(timeout=10)
            assert isinstance(answer, str), "errors must come back as a text frame"
            assert expected_text in answer
            with pytest.raises(websockets.ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        # The failure is logged and confined to that connection.
        assert any(expected_text in r.getMessage() for r in caplog.records)
        obs = make_obs(12)
        np.testing.assert_array_equal(bystander.infer(obs)["actions"], expected_actions(obs))
    finally:
        bystander.close()


def test_our_client_raises_server_text_and_reconnects(echo_server):
    srv, _ = echo_server
    with WebsocketClientPolicy("127.0.0.1", srv.port) as client:
        first_id = client.infer(make_obs(13))["meta_echo"]["meta/connection_id"]
        bad = make_obs(14, **{"observation/image": np.zeros((32, 32), np.uint8)})
        with pytest.raises(RuntimeError, match=r"policy server error: .*observation/image has shape \(32, 32\)"):
            client.infer(bad)
        again = client.infer(make_obs(15))
    assert again["meta_echo"]["meta/connection_id"] != first_id
    assert again["meta_echo"]["meta/request_index"] == 0


def test_several_clients_at_once_get_their_own_answers_and_policy_is_never_reentered(echo_server):
    srv, policy = echo_server
    errors: list[BaseException] = []
    seen_ids: dict[int, set] = {}

    def worker(worker_id: int) -> None:
        try:
            with WebsocketClientPolicy("127.0.0.1", srv.port) as client:
                ids = set()
                for i in range(5):
                    obs = make_obs(1000 * worker_id + i)
                    reply = client.infer(obs)
                    np.testing.assert_array_equal(reply["actions"], expected_actions(obs))
                    assert reply["meta_echo"]["meta/request_index"] == i
                    ids.add(reply["meta_echo"]["meta/connection_id"])
                seen_ids[worker_id] = ids
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(seen_ids) == 6 and all(len(ids) == 1 for ids in seen_ids.values())
    assert len(set().union(*seen_ids.values())) == 6  # one distinct id per connection
    assert policy.max_active == 1  # the lock serialises calls into the non-thread-safe policy


def test_healthz_and_new_connections_answer_while_inference_is_in_flight():
    policy = GatedPolicy()
    with BackgroundServer(policy) as srv:
        result: dict = {}
        client = WebsocketClientPolicy("127.0.0.1", srv.port)
        caller = threading.Thread(target=lambda: result.update(client.infer({"x": np.float32(2.5)})))
        caller.start()
        try:
            assert policy.started.wait(timeout=10), "inference never started"
            with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=10) as resp:
                assert resp.status == 200 and resp.read() == b"OK\n"
            with raw_connect(srv.port) as (_, meta):  # handshake + metadata also served during inference
                assert meta == {"policy": "gated"}
            assert caller.is_alive() and "actions" not in result  # the inference really was still running
        finally:
            policy.release.set()
            caller.join(timeout=30)
            client.close()
    np.testing.assert_array_equal(result["actions"], np.full((HORIZON, 7), 2.5, np.float32))


def test_other_http_paths_are_not_health_checks(echo_server):
    srv, _ = echo_server
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/", timeout=10)
    assert info.value.code != 200


def test_client_waits_for_a_server_that_starts_late():
    port = free_port()
    outcome: dict = {}

    def connect() -> None:
        try:
            with WebsocketClientPolicy("127.0.0.1", port, connect_timeout_s=30, retry_interval_s=0.05) as client:
                outcome["meta"] = client.get_server_metadata()
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=connect)
    thread.start()
    time.sleep(0.3)  # the client is now retrying against a closed port
    with BackgroundServer(GatedPolicy(), port=port):
        thread.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["meta"] == {"policy": "gated"}


def test_client_gives_up_with_a_clear_error():
    port = free_port()
    with pytest.raises(RuntimeError, match=rf"no policy server reachable at ws://127.0.0.1:{port} after 0.3 s"):
        WebsocketClientPolicy("127.0.0.1", port, connect_timeout_s=0.3, retry_interval_s=0.05)


def test_unserialisable_metadata_fails_at_construction():
    class BadMeta(GatedPolicy):
        metadata = {"weights": np.zeros(2, np.complex64)}

    with pytest.raises(ValueError, match="weights"):
        WebsocketPolicyServer(BadMeta(), port=0)


def test_port_in_use_is_a_clear_start_error(echo_server):
    srv, _ = echo_server
    with pytest.raises(RuntimeError, match=rf"failed to start on 127.0.0.1:{srv.port}"):
        BackgroundServer(GatedPolicy(), port=srv.port).start()


def load_serve_policy_script():
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "serve_policy.py"
    spec = importlib.util.spec_from_file_location("serve_policy_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered while the class is built
    spec.loader.exec_module(module)
    return module


def test_serve_policy_cli_forwards_to_create_policy(monkeypatch):
    script = load_serve_policy_script()
    calls: list[dict] = []
    fake = types.ModuleType("openpi.policies.policy_config")
    fake.create_policy = lambda **kwargs: calls.append(kwargs) or EchoPolicy()
    monkeypatch.setitem(sys.modules, "openpi.policies.policy_config", fake)
    # `from openpi.policies import policy_config` reads the package attribute first when the real module was
    # already imported by another test: patch that too, so the test does not depend on test order.
    import openpi.policies
    monkeypatch.setattr(openpi.policies, "policy_config", fake, raising=False)

    default = tyro.cli(script.Args, args=[])
    assert isinstance(default.policy, script.Default) and default.port == 8000 and default.env == script.EnvMode.LIBERO
    script.create_policy(default)
    argv = ["--env", "LIBERO", "--port", "9001", "--default-prompt", "open the drawer", "--record-dir", "/tmp/acts",
            "--record", "llm.layer.3.resid_post", "img.layer.0.resid_post",
            "policy:checkpoint", "--policy.config", "pi05_libero", "--policy.dir", "/ckpt/pi05"]
    args = tyro.cli(script.Args, args=argv)
    assert isinstance(script.create_policy(args), EchoPolicy)
    assert calls == [
        {"default_prompt": None},
        {"default_prompt": "open the drawer", "config_name": "pi05_libero", "checkpoint_dir": "/ckpt/pi05",
         "record_dir": "/tmp/acts", "record_sites": ("llm.layer.3.resid_post", "img.layer.0.resid_post")},
    ]
    assert args.port == 9001
    assert script.ENV_REQUIRED_KEYS[args.env] == LIBERO_REQUIRED_KEYS
    with pytest.raises(ValueError, match="needs --record-dir"):
        script.policy_kwargs(tyro.cli(script.Args, args=["--record", "llm.layer.3.resid_post"]))


def test_server_module_does_not_import_the_model_code():
    code = "import sys, openpi.serving.websocket_server; print(any(m.startswith('openpi.policies.') or " \
           "m.startswith('openpi.models.') or m == 'jax' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_error_replies_are_capped_not_echoing_a_huge_input(echo_server):
    srv, _ = echo_server
    with raw_connect(srv.port) as (ws, _):
        ws.send(msgpack_numpy.packb(make_obs(1, prompt="__long_error__" + "x" * 100_000)))
        text = ws.recv(timeout=10)
        assert isinstance(text, str) and "bad prompt" in text and "more characters cut" in text
        assert len(text) <= MAX_ERROR_CHARS + 60


def test_oversized_messages_are_refused_and_other_clients_keep_working():
    policy = EchoPolicy()
    with BackgroundServer(policy, required_keys=LIBERO_REQUIRED_KEYS, max_message_bytes=64 * 1024) as srv:
        with raw_connect(srv.port) as (ws, _):
            big = make_obs(2)
            big["observation/image"] = np.zeros((256, 256, 3), np.uint8)  # 196 KB > 64 KB
            ws.send(msgpack_numpy.packb(big))
            with pytest.raises(websockets.ConnectionClosed) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # message too big
        with WebsocketClientPolicy("127.0.0.1", srv.port) as client:
            np.testing.assert_allclose(client.infer(make_obs(3))["actions"], expected_actions(make_obs(3)))


def test_server_binds_loopback_by_default_and_warns_on_public_binds(caplog):
    script = load_serve_policy_script()
    assert tyro.cli(script.Args, args=[]).host == DEFAULT_HOST == "127.0.0.1"
    with caplog.at_level(logging.WARNING):
        WebsocketPolicyServer(EchoPolicy(), host="127.0.0.1")
        assert not [r for r in caplog.records if "reachable from other machines" in r.message]
        WebsocketPolicyServer(EchoPolicy(), host="0.0.0.0")
    assert [r for r in caplog.records if "reachable from other machines" in r.message]


def test_serve_policy_refuses_a_record_name_that_matches_nothing(tmp_path):
    """Review item 10: the --help example recorded nothing and served on; now it is a start-up error."""
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "serve_policy.py"
    out = subprocess.run([sys.executable, str(script), "--port", str(free_port()), "--record-dir",
                          str(tmp_path / "store"), "--record", "llm.layer.11.resid_post"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "matches no hook point" in out.stderr and "nearest valid names" in out.stderr
    assert not (tmp_path / "store").exists()  # nothing written
