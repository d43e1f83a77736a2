"""The feature tools behind sae/top_activating_{frames,actions,prompts}.py and sae/dashboard.py.

Each takes :class:`openpi.interp.sae.cli.ToolArgs`, mines the chosen features (openpi.interp.sae.mining) and writes
its outputs; the scripts only parse flags. Output schemas are in each function's docstring.
"""

from __future__ import annotations

import csv
import pathlib

from openpi.interp.sae import dashboard as sae_dashboard
from openpi.interp.sae import frames as sae_frames
from openpi.interp.sae import mining
from openpi.interp.sae.cli import ToolArgs, write_json

_SUMMARY = ("n_rows", "n_episodes", "sort_by", "config", "label_rule", "dropped_stale_rows")


def _mine(args: ToolArgs, need_rollouts: str | None = None) -> tuple[dict, object]:
    sae = args.inputs.load()
    rows = args.inputs.open(need_rollouts)
    return mining.mine(sae, rows, args.mining, args.features, args.sort_by, args.num_features), rows


def _head(args: ToolArgs, rep: dict) -> dict:
    return {"sae": str(args.inputs.sae), **{k: rep[k] for k in _SUMMARY}}


def top_frames(args: ToolArgs) -> dict:
    """DIR/thumbs/fNNNNN_rRR.png (cameras side by side) and DIR/top_frames.json: {sae, n_rows, n_episodes, sort_by,
    config, label_rule, dropped_stale_rows, frames: {written, missing, errors}, features: [{feature, fire_count,
    fire_rate, mean_when_active, max_activation, top: [{rank, activation, stem, run_id, suite, task_id, episode,
    env_step, row, token_index, span, denoise_step, replan_index, image | image_error}]}]}."""
    rep, rows = _mine(args, "the thumbnails are read from its frames/")
    stats = sae_frames.write_thumbnails({f["feature"]: f["top"] for f in rep["features"]}, rows.rollouts,
                                        args.out / "thumbs", args.out)
    keep = ("feature", "fire_count", "fire_rate", "mean_when_active", "max_activation", "top")
    out = _head(args, rep) | {"frames": stats, "features": [{k: f[k] for k in keep} for f in rep["features"]]}
    write_json(args.out / "top_frames.json", out)
    print(f"wrote {args.out / 'top_frames.json'}: {len(out['features'])} features, {stats['written']} thumbnails, "
          f"{stats['missing']} missing frames")
    if stats["written"] == 0 and stats["missing"]:
        raise FileNotFoundError(f"no frame found for any top moment; first: {stats['errors'][0]}")
    return out


def top_actions(args: ToolArgs) -> dict:
    """DIR/top_actions.json: {sae, n_rows, n_episodes, sort_by, config, label_rule, dropped_stale_rows, features:
    [{feature, fire_rate, max_activation, top, actions: {at_top_mean, window_offsets, window_mean, label, corr,
    corr_rows, clusters}}]} and DIR/top_actions.csv, one row per feature: feature, fire_rate, max_activation,
    corr_<dim>..., top_mean_<dim>... (dims: dx dy dz droll dpitch dyaw gripper)."""
    rep, _ = _mine(args, "actions come from the episode records")
    keep = ("feature", "fire_count", "fire_rate", "mean_when_active", "max_activation", "top", "actions")
    out = _head(args, rep) | {"features": [{k: f[k] for k in keep} for f in rep["features"]]}
    write_json(args.out / "top_actions.json", out)
    a_dim = max((len(f["actions"]["corr"] or []) for f in out["features"]), default=0)
    names = sae_dashboard.action_names(a_dim)
    with open(args.out / "top_actions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["feature", "fire_rate", "max_activation", *[f"corr_{n}" for n in names],
                    *[f"top_mean_{n}" for n in names]])
        for f in out["features"]:
            a = f["actions"]
            w.writerow([f["feature"], f["fire_rate"], f["max_activation"], *(a["corr"] or [""] * a_dim),
                        *(a["at_top_mean"] or [""] * a_dim)])
    print(f"wrote {args.out / 'top_actions.json'} and top_actions.csv: {len(out['features'])} features")
    return out


def top_prompts(args: ToolArgs) -> dict:
    """DIR/top_prompts.json: {sae, n_rows, n_episodes, sort_by, config, label_rule, dropped_stale_rows, features:
    [{feature, fire_rate, max_activation, tasks: [{suite, task_id, n_rows, fire_rate, mean_activation}], prompts
    (with --rollouts): [{prompt, n_rows, fire_rate, mean_activation}]}]}, lists sorted by mean_activation."""
    rep, _ = _mine(args)
    keep = ("feature", "fire_count", "fire_rate", "mean_when_active", "max_activation", "tasks", "prompts")
    out = _head(args, rep) | {"features": [{k: f[k] for k in keep if k in f} for f in rep["features"]]}
    write_json(args.out / "top_prompts.json", out)
    print(f"wrote {args.out / 'top_prompts.json'}: {len(out['features'])} features")
    return out


def dashboard(args: ToolArgs) -> pathlib.Path:
    """Static HTML dashboard in DIR (layout: openpi.interp.sae.dashboard); thumbnails and actions with
    --rollouts. Returns DIR/index.html."""
    rep, rows = _mine(args)
    if rows.rollouts is not None:
        rep["frames"] = sae_frames.write_thumbnails({f["feature"]: f["top"] for f in rep["features"]}, rows.rollouts,
                                                    args.out / "thumbs", args.out)
    index = sae_dashboard.build_dashboard(rep, args.out, str(args.inputs.sae), args.sort_by)
    print(f"wrote {index} ({len(rep['features'])} feature pages)")
    return index
