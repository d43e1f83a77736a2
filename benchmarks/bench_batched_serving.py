"""Throughput of one policy server with 1, 4 and 8 concurrent clients, one request at a time vs batched.

Each client sends ``--requests`` LIBERO-shaped observations (distinct ``meta/*`` keys, so each gets its own noise)
and waits for each reply before the next, as the LIBERO client does. Both server modes run in this process on
127.0.0.1 with the same policy; the batched mode gathers concurrent requests into one model call
(``--max-batch``, ``--batch-wait-ms``).

    python benchmarks/bench_batched_serving.py [--config-name pi0_tiny_spatial] [--clients 1 4 8] [--requests 20]

Last printed line, one JSON object: {config, requests_per_client, image_size, results: [{clients, mode,
requests_per_s, median_latency_ms, mean_batch_size}], speedup: {clients: batched / sequential requests_per_s}}.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import tyro

from openpi.policies.libero_policy import example_observation
from openpi.serving.websocket_client import WebsocketClientPolicy
from openpi.serving.websocket_server import LIBERO_REQUIRED_KEYS, BackgroundServer


@dataclasses.dataclass
class Args:
    config_name: str = "pi0_tiny_spatial"
    clients: tuple[int, ...] = (1, 4, 8)
    requests: int = 20
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    image_size: int = 256


def run_clients(port: int, n_clients: int, n_requests: int, image_size: int) -> tuple[float, list[float], list[int]]:
    latencies: list[float] = []
    batch_sizes: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_clients + 1)

    def client(c: int) -> None:
        with WebsocketClientPolicy("127.0.0.1", port, connect_timeout_s=60) as policy:
            obs = [example_observation(seed=c, image_size=image_size) | {"meta/episode": c, "meta/env_step": t}
                   for t in range(n_requests)]
            barrier.wait()
            for o in obs:
                t0 = time.perf_counter()
                reply = policy.infer(o)
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    batch_sizes.append(int(reply["policy_timing"].get("batch_size", 1)))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, batch_sizes


def main(args: Args) -> dict:
    from openpi.policies.policy_config import create_policy

    policy = create_policy(args.config_name)
    for b in sorted({1, *[1 << i for i in range(args.max_batch.bit_length()) if 1 << i <= args.max_batch]}):
        policy.infer_batch([example_observation(seed=i, image_size=args.image_size) for i in range(b)])  # compile
    results = []
    for n in args.clients:
        for mode, max_batch in (("sequential", 1), ("batched", args.max_batch)):
            with BackgroundServer(policy, required_keys=LIBERO_REQUIRED_KEYS, max_batch=max_batch,
                                  batch_wait_ms=args.batch_wait_ms) as srv:
                wall, lat, sizes = run_clients(srv.port, n, args.requests, args.image_size)
            results.append({"clients": n, "mode": mode, "requests_per_s": n * args.requests / wall,
                            "median_latency_ms": float(np.median(lat)), "mean_batch_size": float(np.mean(sizes))})
            print(f"{n} clients, {mode:10s}: {results[-1]['requests_per_s']:7.1f} req/s, median latency "
                  f"{results[-1]['median_latency_ms']:7.1f} ms, mean batch {results[-1]['mean_batch_size']:.2f}")
    rate = {(r["clients"], r["mode"]): r["requests_per_s"] for r in results}
    out = {"config": args.config_name, "requests_per_client": args.requests, "image_size": args.image_size,
           "results": results, "speedup": {str(n): rate[n, "batched"] / rate[n, "sequential"] for n in args.clients}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
