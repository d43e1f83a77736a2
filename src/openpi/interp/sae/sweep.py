"""Score many SAEs by how well their codes read out actions (ridge, episode-grouped split); the library side of
sweep_sae_score_actions.py.

For every SAE folder matching the glob (folders with cfg.json), fits ridge readouts from its codes to each row's
action label and reports R^2 per action dimension and the Matthews correlation of sign and of
above-(training-)median per dimension (protocol: openpi.interp.sae.scoring). The label (``--label``) is
``predicted`` by default: the chunk action the row's token predicts; ``executed``: the action executed at env step +
token index (rule: openpi.interp.join), both read from the episode records of ``--rollouts``. Baselines, computed
once: ridge on the raw activations, and the same with training labels shuffled (should score R^2 <= ~0).

Resumable and shardable: each SAE's result is DIR/per_sae/<name>.json (skipped when already computed for the same
inputs); shard i of n handles every n-th SAE (sorted by path). When every result exists, the run writes
DIR/scores.json and DIR/scores.csv.

scores.json: {inputs, scoring (config, including the label), label_rule, dropped_stale_rows, baselines:
{activations, activations_shuffled_labels}: Result, saes: [{name, dir, arch, k, d_sae, heldout_fvu, result:
Result}], best: {by, name, dir, val_r2_mean, test_r2_mean}}, with Result as documented in
openpi.interp.sae.scoring (best = highest mean validation R^2). scores.csv: one row per SAE and baseline: name,
arch, k, d_sae, heldout_fvu, val/test r2_mean, mcc_sign_mean, mcc_median_mean, then test r2 / mcc_sign /
mcc_median per action dimension.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import pathlib
from typing import Annotated

import numpy as np
import tyro

from openpi.interp.sae import data as sae_data
from openpi.interp.sae import io as sae_io
from openpi.interp.sae import scoring
from openpi.interp.sae.cli import RowInputs, write_json
from openpi.interp.sae.dashboard import action_names
from openpi.shared.io import read_json


@dataclasses.dataclass
class SweepArgs:
    saes: str
    """Glob of SAE folders (quote it), e.g. 'runs/sae_*'."""
    inputs: Annotated[RowInputs, tyro.conf.OmitArgPrefixes]
    out: pathlib.Path
    scoring: Annotated[scoring.ScoringConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=scoring.ScoringConfig)
    baselines: bool = True
    """Also score the raw activations and a shuffled-label control (in shard 0)."""
    shard_index: int = 0
    num_shards: int = 1
    overwrite: bool = False
    """Recompute results that already exist."""


def safe_name(name: str) -> str:
    """A path usable as one file name (per-SAE result files)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def sae_dirs(pattern: str) -> list[pathlib.Path]:
    dirs = sorted(pathlib.Path(p) for p in glob.glob(pattern) if (pathlib.Path(p) / sae_io.CFG_NAME).is_file())
    if not dirs:
        raise FileNotFoundError(f"no SAE folder (with {sae_io.CFG_NAME}) matches {pattern!r}")
    return dirs


def _fingerprint(args: SweepArgs, what: str) -> str:
    x = args.inputs.activations
    blob = json.dumps({"what": what, "activations": str(x.resolve()), "size": x.stat().st_size,
                       "keys": str(args.inputs.keys.resolve()), "select": list(args.inputs.select),
                       "rollouts": str(args.inputs.rollouts.resolve()), "scoring": dataclasses.asdict(args.scoring)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cached(path: pathlib.Path, fp: str, overwrite: bool) -> dict | None:
    if path.is_file() and not overwrite:
        prev = read_json(path, "per-SAE score", hint="delete it to recompute")
        if prev.get("fingerprint") == fp:
            return prev
    return None


def run(args: SweepArgs) -> dict | None:
    """Score this shard's SAEs (and the baselines in shard 0); summarise when every result exists."""
    if not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard-index {args.shard_index} must be in [0, --num-shards {args.num_shards})")
    dirs = sae_dirs(args.saes)
    rows = args.inputs.open("the action labels come from the episode records")
    y, label_rule = sae_data.row_action_labels(rows, args.scoring.label)
    ep, _ = sae_data.episode_ids(rows.keys)
    per = args.out / "per_sae"
    chunk = args.scoring.chunk_rows
    for i, d in enumerate(dirs):
        path = per / f"{safe_name(str(d))}.json"
        sae_cfg = read_json(d / sae_io.CFG_NAME, "SAE config")
        fp = _fingerprint(args, json.dumps(sae_cfg, sort_keys=True) + str((d / sae_io.WEIGHTS_NAME).stat().st_size))
        if i % args.num_shards != args.shard_index or _cached(path, fp, args.overwrite):
            continue
        sae = sae_io.load_sae(d)
        if sae.spec.d_in != rows.d:
            raise ValueError(f"{d}: SAE expects d_in={sae.spec.d_in} but {rows.name} has d={rows.d}")
        res = scoring.score_readout(scoring.sae_feature_stream(sae, rows, chunk), sae.spec.d_sae, y, ep, args.scoring,
                                    desc=d.name)
        metrics_path = d / "metrics.json"
        fvu = read_json(metrics_path, "SAE metrics")["held_out"]["fvu"] if metrics_path.is_file() else None
        write_json(path, {"fingerprint": fp, "name": d.name, "dir": str(d), "arch": sae.spec.arch, "k": sae.spec.k,
                          "d_sae": sae.spec.d_sae, "heldout_fvu": fvu, "result": res})
        print(f"{d.name}: val R2 {res['val']['r2_mean']:.3f}, test R2 {res['test']['r2_mean']:.3f}")
    if args.baselines and args.shard_index == 0:
        for name, shuffle in (("activations", False), ("activations_shuffled_labels", True)):
            path = per / f"baseline__{name}.json"
            cfg = dataclasses.replace(args.scoring, shuffle_labels=shuffle)
            fp = _fingerprint(args, "baseline:" + name)
            if _cached(path, fp, args.overwrite):
                continue
            res = scoring.score_readout(scoring.activation_feature_stream(rows, chunk), rows.d, y, ep, cfg, desc=name)
            write_json(path, {"fingerprint": fp, "name": name, "result": res})
    return summarise(args, dirs, label_rule, rows.attempts.dropped)


def summarise(args: SweepArgs, dirs: list[pathlib.Path], label_rule: dict, dropped: int) -> dict | None:
    """Write scores.json / scores.csv once every SAE (and baseline) result exists."""
    per = args.out / "per_sae"
    results = []
    for d in dirs:
        p = per / f"{safe_name(str(d))}.json"
        if not p.is_file():
            print(f"not all SAEs scored yet ({p.name} missing): run the other shards, then any shard again to summarise")
            return None
        results.append(read_json(p, "per-SAE score"))
    baselines = {}
    if args.baselines:
        for name in ("activations", "activations_shuffled_labels"):
            p = per / f"baseline__{name}.json"
            if not p.is_file():
                print("baselines not computed yet: run shard 0")
                return None
            baselines[name] = read_json(p, "baseline score")["result"]
    best = max(results, key=lambda r: -np.inf if r["result"]["val"]["r2_mean"] is None else r["result"]["val"]["r2_mean"])
    summary = {
        "inputs": {"activations": str(args.inputs.activations), "keys": str(args.inputs.keys),
                   "select": list(args.inputs.select), "rollouts": str(args.inputs.rollouts), "saes": args.saes},
        "scoring": dataclasses.asdict(args.scoring),
        "label_rule": label_rule,
        "dropped_stale_rows": dropped,
        "baselines": baselines,
        "saes": [{k: r[k] for k in ("name", "dir", "arch", "k", "d_sae", "heldout_fvu", "result")} for r in results],
        "best": {"by": "val.r2_mean", "name": best["name"], "dir": best["dir"],
                 "val_r2_mean": best["result"]["val"]["r2_mean"], "test_r2_mean": best["result"]["test"]["r2_mean"]},
    }
    write_json(args.out / "scores.json", summary)
    names = action_names(len(results[0]["result"]["test"]["r2"]))
    with open(args.out / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "arch", "k", "d_sae", "heldout_fvu", "val_r2_mean", "test_r2_mean", "val_mcc_sign_mean",
                    "test_mcc_sign_mean", "val_mcc_median_mean", "test_mcc_median_mean",
                    *[f"test_r2_{n}" for n in names], *[f"test_mcc_sign_{n}" for n in names],
                    *[f"test_mcc_median_{n}" for n in names]])
        entries = [(r["name"], r["arch"], r["k"], r["d_sae"], r["heldout_fvu"], r["result"]) for r in results]
        entries += [(f"baseline:{n}", "", "", "", "", res) for n, res in baselines.items()]
        for name, arch, k, d_sae, fvu, res in entries:
            v, t = res["val"], res["test"]
            w.writerow([name, arch, k, d_sae, fvu, v["r2_mean"], t["r2_mean"], v["mcc_sign_mean"], t["mcc_sign_mean"],
                        v["mcc_median_mean"], t["mcc_median_mean"], *t["r2"], *t["mcc_sign"], *t["mcc_median"]])
    print(f"wrote {args.out / 'scores.json'} and scores.csv; best by validation R2: {best['name']} "
          f"(test R2 {best['result']['test']['r2_mean']:.3f})")
    return summary
