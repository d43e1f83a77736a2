"""Evaluate a policy in LIBERO in this process (no server): the success rates behind model cards and comparisons.

Writes the same records as ``examples/libero/main.py`` (``openpi.envs.rollout``: episodes/, results/, videos), so
resume, shards and the analyses work unchanged; what differs is that the policy is built here with
``create_policy`` and that cameras are rendered only on steps that query the policy unless
``--render-every-step`` (rendering is ~90% of a CPU step; the policy's inputs are unchanged).

    python scripts/eval_policy.py --task-ids 0 1 2 3 --first-trial 40 --num-trials-per-task 10     # default policy
    python scripts/eval_policy.py --random-weights --run-id untrained ...                           # same net, untrained
    python scripts/eval_policy.py --num-workers 2 ...                      # 2 env processes share this one policy
    python scripts/eval_policy.py --policy-config pi0_libero --policy-dir /ckpt/pi0_libero --tokenizer ...
    python scripts/eval_policy.py --policy-config dp_lerobot --policy-dir /ckpt/lerobot_dp   # docs/diffusion_policy.md
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib

import tyro

from openpi.envs import libero_env, rollout
from openpi.policies import policy_config


@dataclasses.dataclass
class Args:
    policy_config: str = policy_config.DEFAULT_CONFIG
    policy_dir: str | None = None
    """Checkpoint directory; default: the config's embedded checkpoint (random weights for configs without one)."""
    random_weights: bool = False
    """Seeded random weights of the same architecture: the untrained baseline."""
    tokenizer: str | None = None
    coefficient_count: str = "openpi"
    """Pi0-FAST configs: decode a wrong DCT coefficient count to zeros ("openpi") or fit it ("fit"); see
    docs/pi0_fast.md."""
    compact_prefix: bool = False
    """Pi0/Pi0.5: drop masked cameras and prompt padding before the transformer (faster, same actions within float
    rounding)."""
    task_suite_name: str = "libero_spatial"
    task_ids: tuple[int, ...] | None = None
    """Subset of task ids (default: all tasks of the suite)."""
    first_trial: int = 0
    """Episodes first_trial .. first_trial + num_trials_per_task - 1 (episode i starts from initial state i)."""
    num_trials_per_task: int = 10
    max_steps: int | None = None
    """Override the suite's step budget (libero_spatial 220)."""
    replan_steps: int = 5
    num_steps_wait: int = 10
    resize_size: int = 224
    seed: int = 7
    """Environment seed (as openpi's client)."""
    policy_seed: int = 0
    """Seed of the flow-matching noise (and of random weights)."""
    render_every_step: bool = False
    save_video: bool = True
    out_dir: str = "data/libero_eval"
    """Root for episodes/, results/, videos/: the folder every analysis takes as --rollouts."""
    run_id: str | None = None
    """Default: <policy config>[-random]-<suite>."""
    shard_index: int = 0
    num_shards: int = 1
    num_workers: int = 1
    """Environment processes stepping episodes in parallel, all asking this process's one policy; same records."""


def main(args: Args, env_factory: rollout.EnvFactory | None = None) -> dict:
    """Run the evaluation; ``env_factory`` (tests) replaces the default one-env-per-task creation (with
    ``--num-workers`` > 1 it must be a module-level function: workers build their own envs)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    libero_env.configure_headless_gl()
    run_id = args.run_id or "-".join([args.policy_config.replace("_", "-")] + (["random"] if args.random_weights
                                                                                  else []) + [args.task_suite_name])
    out = pathlib.Path(args.out_dir)
    cfg = rollout.RolloutConfig(run_id=run_id, out_dir=out, video_dir=out / "videos", seed=args.seed,
                                resize_size=args.resize_size, replan_steps=args.replan_steps,
                                settle_steps=args.num_steps_wait, max_steps=args.max_steps,
                                save_video=args.save_video, render_every_step=args.render_every_step)
    plan = rollout.plan_suite_episodes(args.task_suite_name, args.task_ids, args.num_trials_per_task, args.first_trial)
    mine = rollout.shard_episodes(plan, args.shard_index, args.num_shards)
    policy = policy_config.create_policy(args.policy_config, args.policy_dir, tokenizer=args.tokenizer,
                                         seed=args.policy_seed, random_weights=args.random_weights,
                                         coefficient_count=args.coefficient_count,
                                         compact_prefix=args.compact_prefix)
    extra = {"server_metadata": policy.metadata, "suite": args.task_suite_name}
    try:
        summary = rollout.evaluate(cfg, policy, mine, expected=plan, run_extra=extra, env_factory=env_factory,
                                   close_envs=env_factory is None, num_workers=args.num_workers)
    finally:
        policy.close()
    print(rollout.format_summary(summary))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
