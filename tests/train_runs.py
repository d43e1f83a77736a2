"""What every trainer's tests share: a short run's settings, and the resume check (one run stopped at step 2 and
resumed, one run straight through)."""
from __future__ import annotations

import pathlib
from collections.abc import Callable

from openpi.training import train
from openpi.training.demos import write_synthetic_demos

STEPS = 4


def short_config(demo_root, out_dir, **kw) -> train.TrainConfig:
    """STEPS steps with a checkpoint every 2 and a metrics row every step, all checkpoints kept; ``kw`` overrides
    (each trainer's test sets its policy config, batch size and learning rate)."""
    base = dict(demo_dirs=(str(demo_root),), out_dir=str(out_dir), num_steps=STEPS, end_lr=1e-3, warmup_steps=1,
                save_every=2, log_every=1, keep_last=None)
    return train.TrainConfig(**{**base, **kw})


def stopped_resumed_and_straight(root: pathlib.Path, make_cfg: Callable[..., train.TrainConfig]) -> dict:
    """Run A: stopped at step 2 (stop_at), then resumed to the end. Run B: the same in one go. ``make_cfg(demo_root,
    out_dir)`` builds each run's config."""
    demo_root = write_synthetic_demos(root / "demos", episodes=3, steps=12)
    a, b = root / "run_a", root / "run_b"
    first = train.train(make_cfg(demo_root, a), progress=False, stop_at=2)
    resumed = train.train(make_cfg(demo_root, a), progress=False)
    straight = train.train(make_cfg(demo_root, b), progress=False)
    return {"demos": demo_root, "a": a, "b": b, "first": first, "resumed": resumed, "straight": straight}
