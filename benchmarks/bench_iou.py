"""Throughput of the attention-object metrics (frames/s) on 10,000 synthetic frames.

    python benchmarks/bench_iou.py [--n-frames 10000] [--n-boot 1000]

Times separately: mask pooling (224x224 int32 instance masks -> 16x16 coverage, streamed in chunks), the
metrics (soft mass, top-k / percentile / Otsu IoU, Dice, precision, recall, pointing, ceiling/chance) for the
attention and both baselines, the bootstrap CIs, and the full iou_report (all of it, including per-frame JSON
rows and one object). Target: metrics >= 2000 frames/s. The last printed line is one JSON object.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import tyro

from openpi.interp import iou

TARGET_FPS = 2000.0


@dataclasses.dataclass
class Args:
    n_frames: int = 10_000
    n_boot: int = 1000
    chunk: int = 500
    seed: int = 0


def synthetic_masks(rng: np.random.Generator, n: int) -> np.ndarray:
    """One box object (id 3) per frame at a random place and size, some frames without it."""
    masks = np.zeros((n, 224, 224), np.int32)
    r, c = rng.integers(0, 180, (2, n))
    h, w = rng.integers(8, 60, (2, n))
    for i in range(n):
        if rng.random() > 0.02:
            masks[i, r[i]:r[i] + h[i], c[i]:c[i] + w[i]] = 3
    return masks


def main(args: Args) -> dict:
    rng = np.random.default_rng(args.seed)
    logits = rng.normal(0, 2.0, (args.n_frames, 256))
    att = np.exp(logits) / np.exp(logits).sum(1, keepdims=True) * 0.4  # the camera's share of the row

    pool_s, coverage = 0.0, []
    for start in range(0, args.n_frames, args.chunk):
        masks = synthetic_masks(rng, min(args.chunk, args.n_frames - start))
        t0 = time.perf_counter()
        coverage.append(iou.pool_masks(masks, [3], (16, 16)))
        pool_s += time.perf_counter() - t0
    cov = np.concatenate(coverage)

    t0 = time.perf_counter()
    info = iou.MaskInfo.from_coverage(cov)
    res = iou.evaluate(att, info)
    metrics_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for name in ("attention", "uniform", "center_bias"):
        iou.bootstrap_means({k: v for k, v in res[name].items() if k != "otsu_threshold"}, None, args.n_boot)
    boot_s = time.perf_counter() - t0

    groups = np.repeat(np.arange(args.n_frames // 50 + 1), 50)[: args.n_frames]
    t0 = time.perf_counter()
    iou.iou_report(att, {3: cov}, groups=groups, n_boot=args.n_boot)
    report_s = time.perf_counter() - t0

    n = args.n_frames
    out = {
        "n_frames": n, "n_boot": args.n_boot,
        "pool_fps": n / pool_s, "metrics_fps": n / metrics_s, "bootstrap_s": boot_s,
        "full_report_fps": n / report_s, "metrics_target_fps": TARGET_FPS,
        "metrics_vs_target": n / metrics_s / TARGET_FPS,
        "iou_topk_mean": float(np.nanmean(res["attention"]["iou_topk"])),
    }
    print(f"pooling   {out['pool_fps']:10.0f} frames/s (224x224 int32 masks, one id)")
    print(f"metrics   {out['metrics_fps']:10.0f} frames/s (attention + uniform + centre-bias; target {TARGET_FPS:.0f},"
          f" ratio {out['metrics_vs_target']:.1f}x)")
    print(f"bootstrap {boot_s:10.2f} s for 3 x {len(res['attention'])} metrics, {args.n_boot} resamples")
    print(f"report    {out['full_report_fps']:10.0f} frames/s (metrics + group bootstrap + per-frame rows)")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
