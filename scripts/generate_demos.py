"""Generate scripted LIBERO demonstrations with a privileged-state pick-and-place controller.

Every (task, episode) of the plan is attempted once; successful episodes are kept as demos (format:
``openpi.training.demos`` / docs/training.md), every attempt leaves a record, and ``<out>/summary.json`` holds the
controller's success rate per task. Rerun the same command to resume; shard with ``--shard-index/--num-shards``.

    python scripts/generate_demos.py --out-dir data/demos/spatial --episodes-per-task 10
    python scripts/generate_demos.py --out-dir data/demos/spatial --num-shards 4 --shard-index 2
    python scripts/generate_demos.py --out-dir data/demos/measure --measure-only --episodes-per-task 50
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys

import tyro

from openpi.envs import libero_env
from openpi.training import scripted


@dataclasses.dataclass
class Args:
    out_dir: str = "data/demos/libero_spatial"
    """Root of demos/, attempts/, summary.json and run.json (the settings a rerun must share)."""
    suite: str = "libero_spatial"
    task_ids: tuple[int, ...] | None = None
    """Subset of task ids (default: every task of the suite)."""
    episodes_per_task: int = 10
    """Episode i of a task starts from the suite's initial state i."""
    first_episode: int = 0
    """Attempt episodes first_episode .. first_episode + episodes_per_task - 1 (e.g. held-out initial states)."""
    max_steps: int | None = None
    """Step budget per episode (default: the suite's evaluation budget, libero_spatial 220)."""
    settle_steps: int = 10
    resize_size: int = 224
    """Frames are stored as the policy sees them: rotated 180 degrees, resized with padding to this size."""
    frame_stride: int = 1
    """Render and keep frames every k-th step only (rendering is ~90% of a CPU step); states/actions every step."""
    seed: int = 7
    measure_only: bool = False
    """Skip rendering and demo writing (10x faster): only measure the controller's success rate."""
    shard_index: int = 0
    num_shards: int = 1


def main(args: Args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    libero_env.configure_headless_gl()
    cfg = scripted.GenerateConfig(**dataclasses.asdict(args))
    summary = scripted.generate(cfg)
    for suite, s in summary["suites"].items():
        for task, t in s["tasks"].items():
            print(f"{suite} task {task}: {t['successes']}/{t['attempts']} ({t['success_rate']:.0%}), "
                  f"mean steps {t['mean_steps_success']}, failures {t['failures']}  [{t['prompt']}]")
    print(json.dumps({"total": summary["total"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
