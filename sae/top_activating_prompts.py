"""Tasks and prompts on which each SAE feature fires (rows joined to rollout records by keys).

    python sae/top_activating_prompts.py --sae SAE_DIR --activations X.npy --keys KEYS.npz \
        [--episodes-dir ROLLOUT/episodes] --out DIR

Tasks come from the key columns (suite, task_id); prompts from the episodes' rollout records (needs
--episodes-dir). Writes DIR/top_prompts.json: {sae, n_rows, n_episodes, sort_by, config, features: [{feature,
fire_rate, max_activation, tasks: [{suite, task_id, n_rows, fire_rate, mean_activation}], prompts: [{prompt,
n_rows, fire_rate, mean_activation}]}]}, both lists sorted by mean_activation (desc); fire_rate = fraction of
the group's rows where the feature is non-zero; mean_activation = mean over all the group's rows (zeros included).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Annotated

import tyro

from openpi.interp.sae import data as sae_data
from openpi.interp.sae import io as sae_io
from openpi.interp.sae import mining
from openpi.interp.sae.cli import RowArgs, main_guard, write_json


@dataclasses.dataclass
class Args:
    sae: pathlib.Path
    """SAE folder (cfg.json + sae_weights.safetensors)."""
    rows: Annotated[RowArgs, tyro.conf.OmitArgPrefixes]
    out: pathlib.Path
    episodes_dir: pathlib.Path | None = None
    """Rollout records folder (for prompts); without it only tasks are reported."""
    mining: Annotated[mining.MiningConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=mining.MiningConfig)
    features: tuple[int, ...] = ()
    sort_by: str = "fire_rate"
    num_features: int = 64


def run(args: Args) -> dict:
    sae = sae_io.load_sae(args.sae)
    rows = args.rows.open()
    records = sae_data.EpisodeRecords(args.episodes_dir) if args.episodes_dir is not None else None
    rep = mining.mine(sae, rows, args.mining, records, args.features, args.sort_by, args.num_features)
    keep = ("feature", "fire_count", "fire_rate", "mean_when_active", "max_activation", "tasks", "prompts")
    out = {"sae": str(args.sae), **{k: rep[k] for k in ("n_rows", "n_episodes", "sort_by", "config")},
           "features": [{k: f[k] for k in keep if k in f} for f in rep["features"]]}
    write_json(args.out / "top_prompts.json", out)
    print(f"wrote {args.out / 'top_prompts.json'}: {len(out['features'])} features")
    return out


if __name__ == "__main__":
    _args = tyro.cli(Args)
    main_guard("top_activating_prompts.py", lambda: run(_args))
