"""LIBERO evaluation client: run a policy server's policy on LIBERO tasks and write analysable rollout records.

Same arguments and defaults as openpi's ``examples/libero/main.py`` (openpi's ``--args.`` prefix is accepted too),
plus task subsets, step override, sharding, resume, frames + instance masks, run ids and perturbations.
Output layout and record fields: ``openpi.envs.rollout`` module docstring and docs/libero_eval.md.

    python examples/libero/main.py --task-suite-name libero_spatial --run-id pi05-spatial
    python examples/libero/main.py --task-ids 0 3 --num-trials-per-task 5 --save-frames --perturb.prompt-mode empty
    python examples/libero/main.py --num-workers 2 ...      # 2 env processes; requests still go over one connection
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys

import tyro

from openpi.envs import perturbations, rollout


@dataclasses.dataclass
class Args:
    # --- openpi's arguments -------------------------------------------------------------------------
    host: str = "0.0.0.0"
    """Policy server host (or a full ws:// URI)."""
    port: int = 8000
    resize_size: int = 224
    """Images are rotated 180 degrees and resized with padding to this square size."""
    replan_steps: int = 5
    """Actions executed from each returned chunk before the policy is queried again."""
    task_suite_name: str = "libero_spatial"
    """libero_spatial, libero_object, libero_goal, libero_10 or libero_90."""
    num_steps_wait: int = 10
    """Settle steps with a no-op action after reset (objects fall into place)."""
    num_trials_per_task: int = 50
    """Episodes per task; episode i starts from the suite's initial state i."""
    video_out_path: str = "data/libero/videos"
    seed: int = 7

    # --- additions ----------------------------------------------------------------------------------
    out_dir: str = "data/libero"
    """Root for episodes/, frames/, results/, runs/: the folder every analysis takes as --rollouts."""
    run_id: str | None = None
    """Names this run in file names and join keys (default: <suite>-seed<seed>). Resume uses it."""
    task_ids: tuple[int, ...] | None = None
    """Subset of task ids (default: all tasks of the suite)."""
    first_trial: int = 0
    """Episodes first_trial .. first_trial + num_trials_per_task - 1 (e.g. 40: initial states held out of training)."""
    max_steps: int | None = None
    """Override the suite's step budget (libero_spatial 220, object 280, goal 300, 10 520, 90 400)."""
    shard_index: int = 0
    num_shards: int = 1
    """Split the episodes round-robin over this many processes (e.g. a SLURM array)."""
    num_workers: int = 1
    """Environment processes stepping episodes in parallel (rendering is ~90% of a CPU step). They send their
    requests to this process, which forwards them to the server over its one connection, one at a time."""
    save_frames: bool = False
    """Save per-step agent-view/wrist frames as sent to the policy, plus instance masks (slower: renders masks)."""
    save_video: bool = True
    render_every_step: bool = True
    """--no-render-every-step: render cameras only when the policy is queried (~5x faster on CPU; the video and
    --save-frames get one frame per query, the frames every recorded activation joins to)."""
    retry_errors: bool = True
    """On resume, rerun episodes whose record says a policy request failed (the old record is kept in _errors/)."""
    max_consecutive_errors: int = 3
    """Stop the run after this many episodes in a row failed on policy requests (server down)."""
    connect_timeout_s: float = 300.0
    """How long to wait for the policy server to come up."""
    perturb: perturbations.PerturbationConfig = dataclasses.field(default_factory=perturbations.PerturbationConfig)


def _openpi_argv(argv: list[str]) -> list[str]:
    """Accept openpi's ``--args.task-suite-name`` spelling as well as ``--task-suite-name``."""
    return ["--" + a[len("--args.") :] if a.startswith("--args.") else a for a in argv]


def main(args: Args, env_factory: rollout.EnvFactory | None = None) -> dict:
    """Run the evaluation; ``env_factory`` (tests) replaces the default one-env-per-task creation (with
    ``--num-workers`` > 1 it must be a module-level function: workers build their own envs)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_id = args.run_id or f"{args.task_suite_name}-seed{args.seed}"
    cfg = rollout.RolloutConfig(
        run_id=run_id,
        out_dir=pathlib.Path(args.out_dir),
        video_dir=pathlib.Path(args.video_out_path),
        seed=args.seed,
        resize_size=args.resize_size,
        replan_steps=args.replan_steps,
        settle_steps=args.num_steps_wait,
        max_steps=args.max_steps,
        save_frames=args.save_frames,
        save_video=args.save_video,
        render_every_step=args.render_every_step,
        retry_errors=args.retry_errors,
        max_consecutive_errors=args.max_consecutive_errors,
        perturb=args.perturb,
    )
    plan = rollout.plan_suite_episodes(args.task_suite_name, args.task_ids, args.num_trials_per_task, args.first_trial)
    mine = rollout.shard_episodes(plan, args.shard_index, args.num_shards)

    # Lazy import: the websocket client is only needed when a server is actually used.
    from openpi.serving.websocket_client import WebsocketClientPolicy

    policy = WebsocketClientPolicy(args.host, args.port, connect_timeout_s=args.connect_timeout_s)
    extra = {"server_metadata": policy.get_server_metadata(), "suite": args.task_suite_name}
    try:
        summary = rollout.evaluate(
            cfg, policy, mine, expected=plan, run_extra=extra, env_factory=env_factory, close_envs=env_factory is None,
            num_workers=args.num_workers,
        )
    finally:
        policy.close()
    print(rollout.format_summary(summary))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, args=_openpi_argv(sys.argv[1:])))
