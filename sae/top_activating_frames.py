"""Top-activating frames per SAE feature, with non-max suppression across episodes and time.

    python sae/top_activating_frames.py --sae SAE_DIR --activations X.npy --keys KEYS.npz \
        --frames-dir ROLLOUT/frames --out DIR [--features 3 17] [--sort-by fire_rate --num-features 64]

Rows are joined to frames by (run_id, suite, task_id, episode, env_step); a moment's activation is the max
over its rows. Writes DIR/thumbs/fNNNNN_rRR.png (cameras side by side) and DIR/top_frames.json:
{sae, n_rows, n_episodes, sort_by, config, frames: {written, missing, errors}, features: [{feature,
fire_count, fire_rate, mean_when_active, max_activation, top: [{rank, activation, stem, run_id, suite,
task_id, episode, env_step, row, token_index, span, denoise_step, replan_index, image | image_error}]}]}.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Annotated

import tyro

from openpi.interp.sae import frames as sae_frames
from openpi.interp.sae import io as sae_io
from openpi.interp.sae import mining
from openpi.interp.sae.cli import RowArgs, main_guard, write_json


@dataclasses.dataclass
class Args:
    sae: pathlib.Path
    """SAE folder (cfg.json + sae_weights.safetensors)."""
    rows: Annotated[RowArgs, tyro.conf.OmitArgPrefixes]
    frames_dir: pathlib.Path
    """Rollout frames folder: <stem>.npz with agentview, wrist, env_step."""
    out: pathlib.Path
    mining: Annotated[mining.MiningConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=mining.MiningConfig)
    features: tuple[int, ...] = ()
    """Feature ids to mine (default: the --num-features best by --sort-by)."""
    sort_by: str = "fire_rate"
    """fire_rate | max_activation | mean_when_active."""
    num_features: int = 64


def run(args: Args) -> dict:
    sae = sae_io.load_sae(args.sae)
    rows = args.rows.open()
    rep = mining.mine(sae, rows, args.mining, None, args.features, args.sort_by, args.num_features)
    tops = {f["feature"]: f["top"] for f in rep["features"]}
    if not args.frames_dir.is_dir():
        raise FileNotFoundError(f"frames directory not found: {args.frames_dir}")
    stats = sae_frames.write_thumbnails(tops, args.frames_dir, args.out / "thumbs", args.out)
    keep = ("feature", "fire_count", "fire_rate", "mean_when_active", "max_activation", "top")
    out = {"sae": str(args.sae), **{k: rep[k] for k in ("n_rows", "n_episodes", "sort_by", "config")}, "frames": stats,
           "features": [{k: f[k] for k in keep} for f in rep["features"]]}
    write_json(args.out / "top_frames.json", out)
    print(f"wrote {args.out / 'top_frames.json'}: {len(out['features'])} features, {stats['written']} thumbnails, {stats['missing']} missing frames")
    if stats["written"] == 0 and stats["missing"]:
        print(f"top_activating_frames.py: error: no frame found; first: {stats['errors'][0]}", file=sys.stderr)
        sys.exit(1)
    return out


if __name__ == "__main__":
    _args = tyro.cli(Args)
    main_guard("top_activating_frames.py", lambda: run(_args))
