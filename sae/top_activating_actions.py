"""Executed actions around each SAE feature's top-activating moments, joined by keys to rollout records.

    python sae/top_activating_actions.py --sae SAE_DIR --activations X.npy --keys KEYS.npz \
        --episodes-dir ROLLOUT/episodes --out DIR [--features ...] [--sort-by action_corr]

Writes DIR/top_actions.json: {sae, n_rows, n_episodes, sort_by, config, features: [{feature, fire_rate,
max_activation, top (moments, as in top_frames.json), actions: {at_top_mean, window_offsets, window_mean,
corr, corr_rows, clusters: {centers, sizes, labels}}}]} (definitions: openpi.interp.sae.mining) and
DIR/top_actions.csv with one row per feature: feature, fire_rate, max_activation, corr_<dim>..., top_mean_<dim>...
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Annotated

import tyro

from openpi.interp.sae import data as sae_data
from openpi.interp.sae import io as sae_io
from openpi.interp.sae import mining
from openpi.interp.sae.cli import RowArgs, main_guard, write_json
from openpi.interp.sae.dashboard import _action_names


@dataclasses.dataclass
class Args:
    sae: pathlib.Path
    """SAE folder (cfg.json + sae_weights.safetensors)."""
    rows: Annotated[RowArgs, tyro.conf.OmitArgPrefixes]
    episodes_dir: pathlib.Path
    """Rollout records folder: <stem>.json with executed actions."""
    out: pathlib.Path
    mining: Annotated[mining.MiningConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=mining.MiningConfig)
    features: tuple[int, ...] = ()
    sort_by: str = "action_corr"
    """fire_rate | max_activation | mean_when_active | action_corr (max |correlation| over dims)."""
    num_features: int = 64


def run(args: Args) -> dict:
    sae = sae_io.load_sae(args.sae)
    rows = args.rows.open()
    records = sae_data.EpisodeRecords(args.episodes_dir)
    rep = mining.mine(sae, rows, args.mining, records, args.features, args.sort_by, args.num_features)
    keep = ("feature", "fire_count", "fire_rate", "mean_when_active", "max_activation", "top", "actions")
    out = {"sae": str(args.sae), **{k: rep[k] for k in ("n_rows", "n_episodes", "sort_by", "config")},
           "features": [{k: f[k] for k in keep} for f in rep["features"]]}
    write_json(args.out / "top_actions.json", out)
    a_dim = max((len(f["actions"]["corr"] or []) for f in out["features"]), default=0)
    names = _action_names(a_dim)
    with open(args.out / "top_actions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["feature", "fire_rate", "max_activation", *[f"corr_{n}" for n in names], *[f"top_mean_{n}" for n in names]])
        for f in out["features"]:
            a = f["actions"]
            w.writerow([f["feature"], f["fire_rate"], f["max_activation"], *(a["corr"] or [""] * a_dim), *(a["at_top_mean"] or [""] * a_dim)])
    print(f"wrote {args.out / 'top_actions.json'} and top_actions.csv: {len(out['features'])} features")
    return out


if __name__ == "__main__":
    _args = tyro.cli(Args)
    main_guard("top_activating_actions.py", lambda: run(_args))
