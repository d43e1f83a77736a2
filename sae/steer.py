"""Closed-loop steering: LIBERO episodes with one SAE feature ablated, clamped or scaled at its site, against the
unmodified policy on the same initial states, seeds and flow-matching noise.

    python sae/steer.py --sae out/sae --site llm.expert1.layer.3.resid_post --feature 17 --mode clamp --value 5 \
        --task-ids 0 --trials 3 --max-steps 60 --out out/steer

Writes ``OUT/steer.json``: {spec, baseline: {success_rate, episodes}, steered: {...}, delta_success_rate,
per_episode: [{task_id, episode, baseline_success, steered_success, first_chunk_mean_abs_delta (7,),
executed_mean_abs_delta (7,), common_steps}]}, plus each run's episode records under OUT/baseline, OUT/steered.
Both runs resume after being killed (finished episodes are skipped).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import tyro

from openpi.envs import rollout
from openpi.interp.steering import SteeringSpec, action_change
from openpi.policies.policy_config import DEFAULT_CONFIG, create_policy


@dataclasses.dataclass
class Args:
    sae: str
    site: str
    """hook point the SAE was trained on, e.g. llm.expert1.layer.3.resid_post"""
    feature: int
    out: pathlib.Path
    mode: str = "ablate"
    """ablate | clamp (set to --value) | scale (multiply by --value)"""
    value: float = 0.0
    tokens: str = "actions"
    steps: str = "all"
    """denoising steps to edit ('all' or e.g. '0,1,2')"""
    config: str = DEFAULT_CONFIG
    checkpoint_dir: str | None = None
    suite: str = "libero_spatial"
    task_ids: tuple[int, ...] = (0,)
    trials: int = 3
    max_steps: int | None = None
    seed: int = 7


def main(args: Args) -> dict:
    spec = SteeringSpec(args.sae, args.site, args.feature, args.mode, args.value, args.tokens, args.steps)
    intervention = spec.intervention()  # validates the SAE and feature before any rollout
    plan = rollout.plan_episodes(args.suite, list(args.task_ids), args.trials)
    policy = create_policy(args.config, args.checkpoint_dir)
    policy.table.validate((), (intervention,), num_steps=policy.num_steps)  # a site matching nothing: error now
    results = {}
    # The policy's flow-matching noise is keyed by (suite, task, episode, env step), so both runs see the same
    # noise at the same query whatever the episode lengths: the edit is the only difference.
    for name, interventions in (("baseline", ()), ("steered", (intervention,))):
        cfg = rollout.RolloutConfig(run_id=name, out_dir=args.out / name, video_dir=args.out / name / "videos",
                                    seed=args.seed, max_steps=args.max_steps)
        with policy.hooks(interventions):
            results[name] = rollout.evaluate(cfg, policy, plan, run_extra={"steering": dataclasses.asdict(spec)
                                                                           if name == "steered" else None})
    per_episode = []
    for ep in plan:
        records = {name: json.loads((args.out / name / "episodes" /
                                     f"{rollout.episode_stem(name, ep)}.json").read_text())
                   for name in ("baseline", "steered")}
        per_episode.append({"task_id": ep.task_id, "episode": ep.episode,
                            "baseline_success": records["baseline"]["success"],
                            "steered_success": records["steered"]["success"],
                            **action_change(records["baseline"], records["steered"])})
    report = {"spec": dataclasses.asdict(spec),
              "baseline": {"success_rate": results["baseline"]["total"]["success_rate"]},
              "steered": {"success_rate": results["steered"]["total"]["success_rate"]},
              "per_episode": per_episode}
    report["delta_success_rate"] = report["steered"]["success_rate"] - report["baseline"]["success_rate"]
    (args.out / "steer.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("baseline", "steered", "delta_success_rate")}))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
