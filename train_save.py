"""Train a TopK / BatchTopK sparse autoencoder on activation rows and save it in SAELens' layout.

    python train_save.py --activations X.npy --arch topk|batchtopk --k K --num-latents N --out DIR
    python train_save.py --activations X.npy --keys KEYS.npz --select span=actions denoise_step=9 ... --out DIR

X.npy: (rows, d) float matrix, read memory-mapped (never loaded whole). KEYS.npz (optional): key columns of
docs/conventions.md, one per row; with it, `--select COLUMN=VALUE[,VALUE]` filters rows and whole episodes
are held out. Everything else has data-derived defaults (see openpi.interp.sae.train.TrainConfig).

Writes DIR/cfg.json + DIR/sae_weights.safetensors (SAELens layout, openpi.interp.sae.io), DIR/metrics.json,
DIR/curves.json and DIR/training_curves.png. Checkpoints go to DIR/checkpoint/ while training: killed at any
point, rerunning the same command resumes and ends with the same weights as an uninterrupted run.
`--stop-after-steps N` stops (with a checkpoint) after N steps, to split long runs or to test resuming.

metrics.json fields: fingerprint (config + data hash), arch, d_in, d_sae, k, steps, rows_seen, n_train_rows,
batch_size, lr, input_scale (raw x times this has E||x||^2 = d_in), threshold (BatchTopK inference threshold
in scaled pre-activation units, null for TopK), held_out {fvu, fvu_formula, mse_per_row (raw units), l0,
dead_fraction, dense_fraction, dense_threshold, n_rows} (inference encoder, all held-out rows),
final_train_dead_fraction, config, resolved (derived hyperparameters), source.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Annotated

import tyro

from openpi.interp.sae import data as sae_data
from openpi.interp.sae.cli import main_guard
from openpi.interp.sae import train as sae_train


@dataclasses.dataclass
class Args:
    activations: pathlib.Path
    """(rows, d) float .npy of activation vectors."""
    out: pathlib.Path
    """Output folder (also the resume location)."""
    train: Annotated[sae_train.TrainConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=sae_train.TrainConfig)
    keys: pathlib.Path | None = None
    """Optional .npz of key columns (one entry per row) for --select and episode-grouped hold-out."""
    select: tuple[str, ...] = ()
    """Row filters COLUMN=VALUE[,VALUE...] on the key columns (all must match)."""
    site: str | None = None
    """Name of the recorded site, stored in cfg.json metadata (hook_name)."""
    stop_after_steps: int | None = None
    """Stop after this many steps (checkpointed); rerun without it to finish."""
    overwrite: bool = False
    """Discard a finished SAE or checkpoint of a different configuration in --out."""


def run(args: Args) -> sae_train.TrainResult | None:
    keys = sae_data.load_keys(args.keys) if args.keys is not None else None
    select = sae_data.parse_select(args.select) if args.select else None
    source = sae_train.npy_source(args.activations, args.train, keys=keys, select=select)
    extra = {"site": args.site, "activations": str(args.activations), "select": list(args.select)}
    res = sae_train.train(args.train, source, args.out, stop_after_steps=args.stop_after_steps, overwrite=args.overwrite, extra_metadata=extra)
    if res is None:
        print(f"stopped early; checkpoint in {args.out / sae_train.CHECKPOINT_DIR}; rerun the same command to resume")
        return None
    h = res.metrics["held_out"]
    print(json.dumps({"out": str(args.out), "fvu": h["fvu"], "l0": h["l0"], "dead_fraction": h["dead_fraction"], "dense_fraction": h["dense_fraction"], "steps": res.metrics["steps"]}))
    return res


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = tyro.cli(Args)
    main_guard("train_save.py", lambda: run(args))


if __name__ == "__main__":
    main()
