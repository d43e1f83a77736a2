"""Action error recovered: splice an SAE's reconstruction into the policy at its site and compare the actions with
the unmodified and the zero-ablated policy on recorded observations (definition: openpi.interp.sae.splice).

    python sae/splice_score.py --sae out/sae --site llm.expert1.layer.3.resid_post --rollouts out/rollouts \
        --out out/sae/splice.json [--config pi0_tiny_spatial] [--checkpoint-dir DIR] [--max-obs 50]
    python sae/splice_score.py --sae out/sae --site unet.mid.block.1 --rollouts out/rollouts \
        --out out/sae/splice.json --config dp_tiny_spatial10       # a Diffusion Policy

Writes one JSON object: {site, tokens, steps, n_observations, mse_spliced, mse_zero_ablated,
action_error_recovered, formula, sae, config}.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import tyro

from openpi.interp.sae.splice import action_error_recovered, observations_from_rollouts
from openpi.policies.policy_config import DEFAULT_CONFIG, create_policy
from openpi.shared.io import write_json_atomic


@dataclasses.dataclass
class Args:
    sae: pathlib.Path
    site: str
    """hook point the SAE was trained on, e.g. llm.expert1.layer.3.resid_post"""
    rollouts: pathlib.Path
    """LIBERO client output recorded with --save-frames (episodes/ and frames/)"""
    out: pathlib.Path
    config: str = DEFAULT_CONFIG
    checkpoint_dir: str | None = None
    tokens: str | None = None
    """token selector of the splice (default: actions where the site has tokens, else the whole value)"""
    steps: str = "all"
    max_obs: int | None = 50
    seed: int = 0


def main(args: Args) -> dict:
    policy = create_policy(args.config, args.checkpoint_dir)
    report = action_error_recovered(policy, args.sae, args.site, observations_from_rollouts(args.rollouts, args.max_obs),
                                    tokens=args.tokens, steps=args.steps, seed=args.seed)
    report |= {"sae": str(args.sae), "config": args.config}
    write_json_atomic(args.out, report, indent=1)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
