"""Episodes per hour of in-process LIBERO evaluation with 1 and 2 environment worker processes sharing one policy.

The same plan (``--num-episodes`` episodes of one libero_spatial task, ``--max-steps`` policy steps, cameras
rendered only at policy queries as ``scripts/eval_policy.py`` does, no video) runs once per entry of ``--workers``
(1: the sequential loop in this process; N > 1: ``rollout.evaluate(num_workers=N)``). The policy (default: the
embedded pi0_tiny_spatial, JIT-compiled before timing) stays in this process. Wall time includes creating the
environments (8-13 s per env, paid by every worker), as a real run pays it. The records of each run are compared
with the first run's (attempt ids and timings aside).

    python benchmarks/bench_parallel_libero.py [--num-episodes 4] [--max-steps 50] [--workers 1 2]

Last printed line, one JSON object: {benchmark, config, suite, task_id, episodes, max_steps, machine, results:
[{workers, wall_s, episodes_per_hour, env_s, policy_s}], speedup (last / first episodes per hour),
identical_records}. ``env_s`` / ``policy_s`` sum the episodes' own timings (workers overlap, so they can exceed
the wall time).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import tempfile
import time

import tyro

from openpi.envs import libero_env, rollout
from openpi.policies import policy_config
from openpi.policies.libero_policy import example_observation

VOLATILE = {"attempt", "finished_at", "timing", "run_id"}  # differ between the runs of one episode


@dataclasses.dataclass
class Args:
    config_name: str = policy_config.DEFAULT_CONFIG
    suite: str = "libero_spatial"
    task_id: int = 0
    num_episodes: int = 4
    max_steps: int = 50
    workers: tuple[int, ...] = (1, 2)


def main(args: Args) -> dict:
    libero_env.configure_headless_gl()
    policy = policy_config.create_policy(args.config_name)
    policy.infer(example_observation(image_size=224))  # JIT compile outside the timed runs
    plan = rollout.plan_episodes(args.suite, [args.task_id], args.num_episodes)
    results, records = [], []
    with tempfile.TemporaryDirectory(prefix="bench_parallel_libero_") as tmp:
        for n in args.workers:
            out = pathlib.Path(tmp) / f"w{n}"
            cfg = rollout.RolloutConfig(run_id=f"bench-w{n}", out_dir=out, video_dir=out / "videos",
                                        max_steps=args.max_steps, save_video=False, render_every_step=False)
            start = time.perf_counter()
            rollout.evaluate(cfg, policy, plan, progress=False, num_workers=n)
            wall = time.perf_counter() - start
            recs = [json.loads(cfg.episode_json(spec).read_text()) for spec in plan]
            records.append([{k: v for k, v in r.items() if k not in VOLATILE} for r in recs])
            results.append({"workers": n, "wall_s": round(wall, 1),
                            "episodes_per_hour": round(3600 * len(plan) / wall, 1),
                            "env_s": round(sum(r["timing"]["env_s"] for r in recs), 1),
                            "policy_s": round(sum(r["timing"]["policy_s"] for r in recs), 1)})
            print(results[-1], flush=True)
    policy.close()
    summary = {
        "benchmark": "parallel_libero",
        "config": args.config_name,
        "suite": args.suite,
        "task_id": args.task_id,
        "episodes": len(plan),
        "max_steps": args.max_steps,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "results": results,
        "speedup": round(results[-1]["episodes_per_hour"] / results[0]["episodes_per_hour"], 2),
        "identical_records": all(r == records[0] for r in records[1:]),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
