"""Closed-loop steering: LIBERO episodes with one SAE feature ablated, clamped or scaled at its site, against the
unmodified policy on the same initial states, seeds and flow-matching noise.

    python sae/steer.py --sae out/sae --site llm.expert1.layer.3.resid_post --feature 17 --mode clamp --value 5 \
        --task-ids 0 --trials 3 --max-steps 60 --out out/steer

Writes ``OUT/steer.json``: {spec, baseline: {success_rate}, steered: {success_rate}, delta_success_rate,
per_episode: [{task_id, episode, baseline_success, steered_success, first_chunk_mean_abs_delta (7,),
executed_mean_abs_delta (7,), common_steps}]}, plus each run's rollout folder (episode records in the schema of
openpi.shared.records) under OUT/baseline and OUT/steered. Both runs resume after being killed (finished
episodes are skipped). Library side: openpi.interp.steering.run_steering.
"""
from __future__ import annotations

import json

import tyro

from openpi.interp.steering import SteerArgs, run_steering

if __name__ == "__main__":
    report = run_steering(tyro.cli(SteerArgs))
    print(json.dumps({k: report[k] for k in ("baseline", "steered", "delta_success_rate")}))
