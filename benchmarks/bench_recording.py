"""Cost of recording: plain ``sample_actions`` vs the same call recording (a) the action-expert residual after
every layer for the action tokens at the last denoising step and (b) head-mean attention of the action queries
over all keys at every layer and step; plus activation-store write/read throughput.

    python benchmarks/bench_recording.py [--runs 20]

Last printed line: one JSON object with ``overhead_ratio``, ``write_mb_s``, ``read_mb_s`` (and the raw times).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from openpi.models.hooks import parse_records
from openpi.interp.store import ActivationStore, StoreWriter
from openpi.models.config import tiny_config
from openpi.models.model import Pi0Model, make_observation
from openpi.models.param_shapes import init_params

RECORDS = ("llm.expert1.layer.*.resid_post?tokens=actions&steps=-1", "llm.layer.*.attn.probs?tokens=actions&reduce=heads")


@dataclasses.dataclass
class Args:
    runs: int = 20
    store_rows: int = 200_000
    store_width: int = 1024


def _median_ms(fn, runs: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def main(args: Args) -> None:
    cfg = tiny_config(max_token_len=48)
    model = Pi0Model(cfg, init_params(cfg))
    rng = np.random.default_rng(0)
    obs = make_observation({k: rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8) for k in cfg.image_keys},
                           {k: np.array([k != "right_wrist_0_rgb"]) for k in cfg.image_keys},
                           np.zeros((1, 32), np.float32), rng.integers(1, 100, (1, 48)), np.arange(48)[None] < 12)
    noise = jnp.asarray(rng.standard_normal((1, 10, 32)), jnp.float32)
    records = parse_records(RECORDS)
    # interleave so machine-load drift hits both alike
    plain, recorded = [], []
    for _ in range(3):
        plain.append(_median_ms(lambda: model.sample_actions(obs, noise)[0], args.runs))
        recorded.append(_median_ms(lambda: model.sample_actions(obs, noise, records=records), args.runs))
    plain_ms, rec_ms = float(np.median(plain)), float(np.median(recorded))
    print(f"sample_actions: plain {plain_ms:.2f} ms, recording {rec_ms:.2f} ms, ratio {rec_ms / plain_ms:.3f}")

    root = tempfile.mkdtemp(prefix="bench_store_")
    try:
        data = rng.standard_normal((args.store_rows, args.store_width)).astype(np.float32)
        chunk = 4096
        start = time.perf_counter()
        with StoreWriter(root, {"bench": True}, writer_id="bench", shard_rows=16384) as w:
            for i in range(0, args.store_rows, chunk):
                n = min(chunk, args.store_rows - i)
                w.add("site", data[i:i + n], {"run_id": "b", "suite": "s", "task_id": 0, "episode": i // chunk,
                                               "env_step": np.arange(n), "replan_index": 0, "denoise_step": 9,
                                               "token_index": -1, "span": "actions", "span_table": 0})
                w.commit()
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        rows = sum(len(x) for x, _ in ActivationStore(root).iter_batches("site", batch_size=8192))
        read_s = time.perf_counter() - start
        assert rows == args.store_rows
    finally:
        shutil.rmtree(root)
    mb = data.nbytes / 1e6
    result = {"plain_ms": plain_ms, "recording_ms": rec_ms, "overhead_ratio": rec_ms / plain_ms,
              "write_mb_s": mb / write_s, "read_mb_s": mb / read_s, "store_mb": mb, "device": str(jax.devices()[0])}
    print(f"store: wrote {mb:.0f} MB at {result['write_mb_s']:.0f} MB/s, read at {result['read_mb_s']:.0f} MB/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main(tyro.cli(Args))
