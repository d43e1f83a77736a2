"""Train a TopK / BatchTopK sparse autoencoder on activation rows and save it in SAELens' layout.

    python train_save.py --activations X.npy --keys KEYS.npz --arch topk|batchtopk --k K --num-latents N --out DIR
    python train_save.py --activations X.npy --keys KEYS.npz --select span=actions denoise_step=9 ... --out DIR
    python train_save.py --activations X.npy --split rows --out DIR     # no keys: row blocks, labelled as such

X.npy: (rows, d) float matrix, read memory-mapped (never loaded whole). KEYS.npz: key columns of
docs/conventions.md, one per row (export_activations.py writes it next to X.npy). Held-out rows are whole
episodes (`--split episodes`, the default, needs KEYS.npz); `--split rows` holds out contiguous row blocks, which
leaks (a held-out row's other tokens, denoising steps and queries are in training) and is labelled so wherever its
numbers appear. `--select COLUMN=VALUE[,VALUE]` filters rows. Everything else has data-derived defaults (see
openpi.interp.sae.train.TrainConfig).

Writes DIR/cfg.json + DIR/sae_weights.safetensors (SAELens layout, openpi.interp.sae.io), DIR/metrics.json,
DIR/curves.json, DIR/training_curves.png and DIR/run.json (the settings, openpi.shared.rundir). Checkpoints go to
DIR/checkpoints/<step>/ while training: killed at any point, rerunning the same command resumes and ends with the
same weights as an uninterrupted run; other settings are refused naming each difference (--overwrite starts
over). `--stop-after-steps N` stops (with a checkpoint) after N steps, to split long runs or to test resuming.

metrics.json fields: fingerprint (run fingerprint: config + exact rows), arch, d_in, d_sae, k, steps, rows_seen,
n_train_rows, batch_size, lr, input_scale (raw x times this has E||x||^2 = d_in), threshold (BatchTopK inference
threshold in scaled pre-activation units, null for TopK), split {kind "episodes"|"rows", n_train_rows,
n_eval_rows, n_train_episodes, n_eval_episodes, eval_episodes | block_rows, n_train_blocks, n_eval_blocks, warning;
unit}, held_out {fvu, fvu_ci_low, fvu_ci_high, interval, split, fvu_formula, mse_per_row (raw units), l0,
dead_fraction, dense_fraction, dense_threshold, n_rows} (inference encoder, all held-out rows), baselines {split,
train_mean {fvu, ci_low, ci_high}, pca_same_l0 {fvu, ci_low, ci_high, n_components}, pca_minus_sae,
mean_minus_sae {mean, ci_low, ci_high}} (same held-out rows and resamples), final_train_dead_fraction, config,
resolved (derived hyperparameters), source.
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
from openpi.shared.io import jsonable


@dataclasses.dataclass
class Args:
    activations: pathlib.Path
    """(rows, d) float .npy of activation vectors."""
    out: pathlib.Path
    """Output folder (also the resume location)."""
    train: Annotated[sae_train.TrainConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=sae_train.TrainConfig)
    keys: pathlib.Path | None = None
    """.npz of key columns (one entry per row): whole episodes are held out, and --select filters on them."""
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
    print(json.dumps(jsonable({"out": str(args.out), "split": h["split"]["kind"], "fvu": h["fvu"],
                               "fvu_ci": [h.get("fvu_ci_low"), h.get("fvu_ci_high")], "l0": h["l0"],
                               "dead_fraction": h["dead_fraction"], "dense_fraction": h["dense_fraction"],
                               "steps": res.metrics["steps"]})))
    return res


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = tyro.cli(Args)
    main_guard("train_save.py", lambda: run(args))
