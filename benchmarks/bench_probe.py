"""Streaming ridge-probe throughput at scale (default 2048 features), extrapolated to 1e6 rows.

    python benchmarks/bench_probe.py                       # 65,536 rows x 2048, float64 and float32 products
    python benchmarks/bench_probe.py --rows 1000000        # the full-size run
    python benchmarks/bench_probe.py --blas-threads 1      # on a shared, oversubscribed machine (3x faster here)

Measures (1) accumulation of per-fold sufficient statistics from a stream of batches (rows/s; batches are
pre-generated and cycled so data generation is not timed), (2) the solve: one eigendecomposition per CV fold
plus the refit, for the whole penalty path and all target sets, and (3) the time a 1e6-row run would take
(accumulation scaled linearly + the solve, which does not depend on the row count), and the peak resident memory
of the process (``peak_rss_mb``). It also checks, on a
small problem, that the streaming result equals the in-memory SVD reference and prints the speed ratio.
The last printed line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import tyro

from openpi.interp import probes as P


@dataclasses.dataclass
class Args:
    rows: int = 65536
    features: int = 2048
    targets: int = 7
    n_shuffles: int = 3
    batch_size: int = 4096
    groups: int = 200
    n_folds: int = 5
    dtypes: tuple[str, ...] = ("float64", "float32")
    seed: int = 0
    blas_threads: int = 0
    """limit BLAS threads (threadpoolctl); 0 = library default. On an oversubscribed machine 1 is much faster."""


def stream(pool: list[np.ndarray], y: np.ndarray, groups: np.ndarray, rows: int, batch: int):
    """Cycle pre-generated feature batches; keys carry the global row index."""
    i = 0
    for lo in range(0, rows, batch):
        hi = min(lo + batch, rows)
        X = pool[i % len(pool)][: hi - lo]
        i += 1
        yield X, {"row": np.arange(lo, hi)}


def main(args: Args) -> dict:
    rng = np.random.default_rng(args.seed)
    d, t = args.features, args.targets
    groups = np.repeat(np.arange(args.groups), -(-args.rows // args.groups))[: args.rows]
    y = rng.standard_normal((args.rows, t))
    stacked = P.stack_shuffles(y, groups, args.n_shuffles, args.seed)
    split = P.make_group_split(groups, args.n_folds, 0.2, args.seed)
    pool = [rng.standard_normal((args.batch_size, d), dtype=np.float32) + 3.0 for _ in range(4)]
    out: dict = {"rows": args.rows, "features": d, "target_columns": stacked.shape[1], "batch_size": args.batch_size}
    for dt in args.dtypes:
        t0 = time.perf_counter()
        stats, _ = P.accumulate_stats(stream(pool, y, groups, args.rows, args.batch_size), P.array_join(stacked, groups), split,
                                      n_targets=stacked.shape[1], compute_dtype=np.dtype(dt))
        acc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        P.ridge_cv_from_stats(stats, P.DEFAULT_ALPHAS, P.shuffle_target_sets(t, args.n_shuffles))
        solve_s = time.perf_counter() - t0
        rps = args.rows / acc_s
        out[dt] = {"accumulate_s": round(acc_s, 2), "rows_per_s": round(rps, 1), "solve_s": round(solve_s, 2),
                   "n_alphas": len(P.DEFAULT_ALPHAS), "eigendecompositions": args.n_folds + 1,
                   "extrapolated_1e6_rows_s": round(1e6 / rps + solve_s, 1)}
        print(f"{dt}: {rps:,.0f} rows/s accumulating, solve {solve_s:.1f} s -> 1e6 rows in ~{out[dt]['extrapolated_1e6_rows_s']:.0f} s", flush=True)
        del stats

    # Small agreement + speed check against the in-memory SVD reference.
    n_s, d_s = 6000, 256
    Xs = rng.standard_normal((n_s, d_s)).astype(np.float32)
    gs = np.repeat(np.arange(60), n_s // 60)
    ys = Xs[:, :8] @ rng.standard_normal((8, 3)) + rng.standard_normal((n_s, 3))
    sp = P.make_group_split(gs, args.n_folds, 0.2, args.seed)
    t0 = time.perf_counter()
    st, _ = P.accumulate_stats(P.array_batches(Xs, 1000), P.array_join(ys, gs), sp, n_targets=3)
    r_stream = P.ridge_cv_from_stats(st)["y"]
    stream_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r_dense = P.ridge_cv_dense(Xs, ys, sp.assign(gs))
    dense_s = time.perf_counter() - t0
    out["check_small"] = {"rows": n_s, "features": d_s, "stream_s": round(stream_s, 3), "dense_svd_s": round(dense_s, 3),
                          "dense_over_stream": round(dense_s / stream_s, 2),
                          "max_abs_test_r2_diff": float(np.max(np.abs(r_stream.test_r2 - r_dense.test_r2))),
                          "same_alpha": bool(r_stream.best_alpha == r_dense.best_alpha)}
    print(f"small check: dense SVD path / streaming = {dense_s / stream_s:.2f}x, max |R^2 diff| = {out['check_small']['max_abs_test_r2_diff']:.2e}")
    return out


def run(args: Args) -> dict:
    import os
    import resource

    import scipy.linalg  # noqa: F401  (load scipy's own BLAS before limiting, or it escapes the limit)
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_info, threadpool_limits

    ctx = threadpool_limits(limits=args.blas_threads, user_api="blas") if args.blas_threads > 0 else None
    try:
        load_before = os.getloadavg()[0]
        out = main(args)
        out["blas_threads"] = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        out["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        out["cpu_count"] = os.cpu_count()
        # Peak resident memory of the whole run: the stream never holds more than the batch pool, y and the stats.
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return out
    finally:
        if ctx is not None:
            ctx.restore_original_limits()


if __name__ == "__main__":
    print(json.dumps(run(tyro.cli(Args))))
