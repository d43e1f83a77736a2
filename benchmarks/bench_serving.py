"""Round-trip latency through the websocket server vs calling ``policy.infer`` in-process.

Both paths get the same LIBERO-shaped observation (two 224x224x3 uint8 images, 8 state floats, a prompt). The
server runs on a background thread of this process (``BackgroundServer`` on 127.0.0.1), so the websocket numbers
include loopback TCP, msgpack encode/decode on both sides, the executor hop and GIL sharing with the client.

    python benchmarks/bench_serving.py                                  # synthetic policy: pure transport cost
    python benchmarks/bench_serving.py --policy config --config-name pi0_tiny   # the real policy (JIT warmed up)

Last printed line, one JSON object:
    policy            "synthetic" or "config:<name>"
    iterations        timed calls per path (after ``warmup`` untimed calls each)
    payload_bytes     size of the packed observation
    inprocess_ms      median wall time of policy.infer(obs)
    websocket_ms      median wall time of client.infer(obs) (send + server + reply + decode)
    overhead_ms       websocket_ms - inprocess_ms
    ratio             websocket_ms / inprocess_ms
    inprocess_p90_ms, websocket_p90_ms   90th percentiles
    server_infer_ms   median of the server-reported server_timing.infer_ms (policy time seen by the server)
    codec_ms          median time to pack + unpack the observation once (no network)
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Literal

import numpy as np
import tqdm
import tyro

from openpi.serving import msgpack_numpy
from openpi.serving.websocket_client import WebsocketClientPolicy
from openpi.serving.websocket_server import BackgroundServer


@dataclasses.dataclass
class Args:
    policy: Literal["synthetic", "config"] = "synthetic"
    """synthetic: a cheap numpy policy (measures transport overhead); config: create_policy(config_name, ...)."""
    config_name: str = "pi0_tiny"
    checkpoint_dir: str | None = None
    iterations: int = 50
    warmup: int = 5
    image_size: int = 224
    horizon: int = 10
    seed: int = 0


class SyntheticPolicy:
    """Does a little numpy work on the observation and returns an (H, 7) chunk, like a very fast model."""

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.metadata = {"policy": "synthetic", "action_horizon": horizon}

    def infer(self, obs: dict) -> dict:
        t0 = time.perf_counter()
        colour = obs["observation/image"].reshape(-1, 3).mean(axis=0) / 255.0
        state = np.asarray(obs["observation/state"], np.float32)
        actions = (np.arange(self.horizon, dtype=np.float32)[:, None] * 0.01 + state[None, :7]
                   + colour[np.arange(7) % 3][None, :]).astype(np.float32)
        return {"actions": actions, "policy_timing": {"infer_ms": (time.perf_counter() - t0) * 1e3}}


def libero_observation(image_size: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8).astype(np.float32),
        "prompt": "put the black bowl on the plate",
        "meta/run_id": "bench",
    }


def make_policy(args: Args) -> Any:
    if args.policy == "synthetic":
        return SyntheticPolicy(args.horizon)
    from openpi.policies import policy_config  # lazy: only the real-policy mode needs the model code

    return FixedNoisePolicy(policy_config.create_policy(config_name=args.config_name,
                                                        checkpoint_dir=args.checkpoint_dir), args.seed)


class FixedNoisePolicy:
    """The real policy with the same flow-matching noise on every call, so the websocket and in-process answers to
    one observation can be compared exactly (the policy otherwise draws fresh noise per call)."""

    def __init__(self, policy: Any, seed: int) -> None:
        self.policy = policy
        self.metadata = policy.metadata
        cfg = policy.model.config
        self.noise = np.random.default_rng(seed).standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)

    def infer(self, obs: dict) -> dict:
        return self.policy.infer(obs, noise=self.noise)


def time_calls(fn, obs: dict, n: int, warmup: int, desc: str) -> tuple[np.ndarray, list[dict]]:
    for _ in range(warmup):
        fn(obs)
    times, replies = [], []
    for _ in tqdm.trange(n, desc=desc, leave=False):
        t0 = time.perf_counter()
        replies.append(fn(obs))
        times.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(times), replies


def main(args: Args) -> dict[str, Any]:
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    policy = make_policy(args)
    obs = libero_observation(args.image_size, args.seed)
    payload = msgpack_numpy.packb(obs)

    codec = []
    for _ in range(max(args.iterations, 10)):
        t0 = time.perf_counter()
        msgpack_numpy.unpackb(msgpack_numpy.packb(obs))
        codec.append((time.perf_counter() - t0) * 1e3)

    inproc, local_replies = time_calls(policy.infer, obs, args.iterations, args.warmup, "in-process")
    with BackgroundServer(policy) as srv, WebsocketClientPolicy("127.0.0.1", srv.port, connect_timeout_s=30) as client:
        remote, remote_replies = time_calls(client.infer, obs, args.iterations, args.warmup, "websocket")
    if not np.allclose(np.asarray(local_replies[-1]["actions"]), remote_replies[-1]["actions"]):
        raise RuntimeError("websocket and in-process actions differ for the same observation")

    inprocess_ms = float(np.median(inproc))
    websocket_ms = float(np.median(remote))
    result = {
        "policy": args.policy if args.policy == "synthetic" else f"config:{args.config_name}",
        "iterations": args.iterations,
        "payload_bytes": len(payload),
        "inprocess_ms": inprocess_ms,
        "websocket_ms": websocket_ms,
        "overhead_ms": websocket_ms - inprocess_ms,
        "ratio": websocket_ms / inprocess_ms if inprocess_ms > 0 else float("inf"),
        "inprocess_p90_ms": float(np.percentile(inproc, 90)),
        "websocket_p90_ms": float(np.percentile(remote, 90)),
        "server_infer_ms": float(np.median([r["server_timing"]["infer_ms"] for r in remote_replies])),
        "codec_ms": float(np.median(codec)),
    }
    print(f"policy {result['policy']}, {args.iterations} calls, observation {len(payload) / 1e3:.1f} kB")
    print(f"in-process policy.infer  median {inprocess_ms:8.3f} ms   p90 {result['inprocess_p90_ms']:8.3f} ms")
    print(f"websocket client.infer   median {websocket_ms:8.3f} ms   p90 {result['websocket_p90_ms']:8.3f} ms")
    print(f"overhead {result['overhead_ms']:.3f} ms (x{result['ratio']:.2f}); "
          f"pack+unpack alone {result['codec_ms']:.3f} ms")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
