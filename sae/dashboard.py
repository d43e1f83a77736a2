"""Static HTML feature dashboard (offline): index sorted by a statistic, one page per feature.

    python sae/dashboard.py --sae SAE_DIR --activations X.npy --keys KEYS.npz [--episodes-dir ROLLOUT/episodes] \
        [--frames-dir ROLLOUT/frames] --out DIR [--sort-by fire_rate|max_activation|mean_when_active|action_corr]

Open DIR/index.html in a browser. Layout and the mining.json schema: openpi.interp.sae.dashboard / .mining.
Without --frames-dir the pages have no thumbnails; without --episodes-dir no actions or prompts.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Annotated

import tyro

from openpi.interp.sae import dashboard as sae_dashboard
from openpi.interp.sae import data as sae_data
from openpi.interp.sae import frames as sae_frames
from openpi.interp.sae import io as sae_io
from openpi.interp.sae import mining
from openpi.interp.sae.cli import RowArgs, main_guard


@dataclasses.dataclass
class Args:
    sae: pathlib.Path
    """SAE folder (cfg.json + sae_weights.safetensors)."""
    rows: Annotated[RowArgs, tyro.conf.OmitArgPrefixes]
    out: pathlib.Path
    episodes_dir: pathlib.Path | None = None
    """Rollout records (actions, prompts)."""
    frames_dir: pathlib.Path | None = None
    """Rollout frames (thumbnails)."""
    mining: Annotated[mining.MiningConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=mining.MiningConfig)
    features: tuple[int, ...] = ()
    sort_by: str = "fire_rate"
    """Statistic that picks the features (unless --features) and orders the index."""
    num_features: int = 64


def run(args: Args) -> pathlib.Path:
    sae = sae_io.load_sae(args.sae)
    rows = args.rows.open()
    records = sae_data.EpisodeRecords(args.episodes_dir) if args.episodes_dir is not None else None
    if args.frames_dir is not None and not args.frames_dir.is_dir():
        raise FileNotFoundError(f"frames directory not found: {args.frames_dir}")
    rep = mining.mine(sae, rows, args.mining, records, args.features, args.sort_by, args.num_features)
    if args.frames_dir is not None:
        stats = sae_frames.write_thumbnails({f["feature"]: f["top"] for f in rep["features"]}, args.frames_dir, args.out / "thumbs", args.out)
        rep["frames"] = stats
    index = sae_dashboard.build_dashboard(rep, args.out, str(args.sae), args.sort_by)
    print(f"wrote {index} ({len(rep['features'])} feature pages)")
    return index


if __name__ == "__main__":
    _args = tyro.cli(Args)
    main_guard("dashboard.py", lambda: run(_args))
