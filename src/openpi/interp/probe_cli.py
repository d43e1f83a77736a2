"""Linear probes per layer: grouped-CV ridge (regression) or logistic (binary / multiclass), baselines, INLP.

    python linear_probe.py --features acts/layer_*.npy --targets actions.npy --groups episode_ids.npy --out out/probe
    python linear_probe.py --features acts/ --layer-names L0 L1 L2 --targets gripper.npy --groups ep.npy \\
        --target-kind binary --out out/probe_gripper
    python linear_probe.py --features acts/layer_11.npy --targets actions.npy --groups ep.npy --inlp --out out/inlp
    python linear_probe.py --features EXPORT/X.npy --targets EXPORT/actions.npy --groups EXPORT/groups.npy --out out/probe

An export_activations.py folder holds all three: ``actions.npy`` labels each action-token row with the chunk action
its token predicts (``executed_actions.npy`` + ``executed_valid.npy`` hold the executed one where it exists),
``groups.npy`` the episode of each row.

Inputs: each ``--features`` entry is a .npy file (n, d), a directory (its *.npy files, natural order) or a
glob; one entry per layer. ``--targets`` (n,) or (n, t); ``--groups`` (n,) episode ids (int or str; make them
unique across suites/runs). Regression features are streamed from memory-mapped files in ``--batch-size`` row
batches (per-fold sufficient statistics), so a 1e6 x 2048 file is never loaded; classification loads each
layer into memory (scikit-learn logistic regression).

Writes ``DIR/probe_results.json`` (schema in docs/probes.md and ``openpi.interp.probes``), ``DIR/run.json`` (the
settings and input file stamps, openpi.shared.rundir: a rerun with other settings is refused naming each
difference, ``--overwrite`` starts over), per-layer partial results ``DIR/layers/<name>.json`` (a killed run
resumes from them; ``--shard-index/--num-shards`` split layers across jobs, and whichever job finds every layer
done writes the summary), plots ``r2_vs_layer.png`` or
``accuracy_vs_layer.png``, ``cv_curves.png``, ``r2_per_dim.png``; with ``--inlp`` also ``inlp_results.json``,
``inlp.png`` and ``inlp_basis.npy`` (removed directions, standardised space).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Literal

import numpy as np

from openpi.interp import inlp as I
from openpi.interp import probes as P
from openpi.shared.records import ACTION_NAMES
from openpi.shared.rundir import run_option, settings_of

SCHEMA = "vla-interp/probe_results/v1"


@dataclasses.dataclass
class Args:
    features: tuple[str, ...]
    """one .npy per layer (n, d), or a directory / glob expanding to them (natural sort)."""
    targets: str
    """(n,) or (n, t) .npy targets, row-aligned with every features file."""
    groups: str
    """(n,) .npy group (episode) ids; whole groups go to one CV fold or to the test part."""
    out: str = run_option("out/probe")
    """output folder (a path ending in .json names the results file inside its folder)."""
    target_kind: Literal["regression", "binary", "multiclass"] = "regression"
    target_columns: tuple[int, ...] = ()
    """keep only these target columns (e.g. 0 1 2 of a state array for end-effector position)."""
    target_names: tuple[str, ...] = ()
    """names of the (selected) target columns; 7-D regression targets default to the LIBERO action names."""
    layer_names: tuple[str, ...] = ()
    """one name per resolved features file (default: file stems)."""
    order: str | None = None
    """(n,) .npy time index (e.g. env_step) ordering rows inside each group for the shuffled baseline."""
    strata: str | None = None
    """(n,) .npy per-row stratum (constant per group, e.g. task id) to balance the split; classification
    targets that are constant within groups are used automatically."""
    n_folds: int = 5
    test_fraction: float = 0.2
    seed: int = 0
    alphas: tuple[float, ...] = P.DEFAULT_ALPHAS
    """ridge penalty path (per-row alpha; lambda = alpha * n_train on standardised features)."""
    cs: tuple[float, ...] = P.DEFAULT_CS
    """logistic C path (inverse L2 strength)."""
    n_shuffles: int = 3
    """number of shuffled-label baselines (INLP uses max(this, 2))."""
    random_features: bool = True
    """also probe i.i.d. Gaussian features of the same dimension."""
    batch_size: int = 4096
    compute_dtype: Literal["float64", "float32"] = "float64"
    """dtype of the per-batch X^T X products (sums are always float64); float32 is ~2x faster."""
    inlp: bool = False
    """run INLP on one layer (``--inlp-layer``, default: the best layer by CV score)."""
    inlp_layer: str | None = None
    inlp_max_iter: int = 20
    inlp_z: float = 2.0
    inlp_tol: float = 0.01
    shard_index: int = run_option(0)
    num_shards: int = run_option(1)
    progress: bool = run_option(True)
    overwrite: bool = run_option(False)
    """start over in --out (a rerun with other settings is refused otherwise)."""


def natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def resolve_features(entries: tuple[str, ...]) -> list[str]:
    paths: list[str] = []
    for e in entries:
        if os.path.isdir(e):
            found = sorted(glob.glob(os.path.join(e, "*.npy")), key=natural_key)
            if not found:
                raise FileNotFoundError(f"features directory {e} holds no .npy files")
            paths += found
        elif os.path.isfile(e):
            paths.append(e)
        else:
            found = sorted(glob.glob(e), key=natural_key)
            if not found:
                raise FileNotFoundError(f"features {e!r} is neither a file, a directory nor a matching glob")
            paths += found
    return paths


def load_array(path: str, what: str, mmap: bool = False) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} not found")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as e:
        raise ValueError(f"{what} file {path} is not a plain .npy array ({e})") from e


def prepare_targets(args: Args, y: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Select/validate targets for the chosen kind; returns (targets, column names)."""
    if args.target_kind == "regression":
        Y = P.as_target_matrix(y, f"targets {args.targets}")
        if args.target_columns:
            bad = [c for c in args.target_columns if not -Y.shape[1] <= c < Y.shape[1]]
            if bad:
                raise P.ProbeInputError(f"--target-columns {bad} out of range for targets {args.targets} with {Y.shape[1]} columns")
            Y = Y[:, list(args.target_columns)]
        names = list(args.target_names) or (list(ACTION_NAMES) if Y.shape[1] == len(ACTION_NAMES) else [f"dim{j}" for j in range(Y.shape[1])])
        if len(names) != Y.shape[1]:
            raise P.ProbeInputError(f"--target-names has {len(names)} names for {Y.shape[1]} target columns")
        P.check_not_constant(Y, names)
        return Y, names
    y = np.asarray(y)
    if y.ndim == 2 and args.target_columns:
        y = y[:, list(args.target_columns)]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise P.ProbeInputError(f"{args.target_kind} targets {args.targets} must be 1-D labels; found shape {y.shape} (use --target-columns to pick one)")
    if np.issubdtype(y.dtype, np.floating):
        P.check_finite(y, f"targets {args.targets}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise P.ProbeInputError(f"targets {args.targets} are constant (single class {classes.tolist()}): nothing to probe")
    if args.target_kind == "binary" and len(classes) != 2:
        raise P.ProbeInputError(f"--target-kind binary needs exactly 2 classes; targets {args.targets} hold {len(classes)}: {classes[:10].tolist()}")
    return y, list(args.target_names) or ["label"]


def run_settings(args: Args, paths: list[str], names: list[str]) -> dict:
    """What the results depend on: every setting (run options excluded by declaration) and the input files."""
    files = {f"features/{n}": p for n, p in zip(names, paths)}
    files |= {"targets": args.targets, "groups": args.groups, "order": args.order, "strata": args.strata}
    return {"probe": args, "inputs": P.input_stamps(files)}


def probe_layer(args: Args, name: str, path: str, y: np.ndarray, groups: np.ndarray, order: np.ndarray | None, split: P.GroupSplit, names: list[str]) -> dict:
    X = load_array(path, f"features ({name})", mmap=True)
    if X.ndim != 2:
        raise P.ProbeInputError(f"features {path} must be (n, d); found shape {X.shape}")
    P.check_rows_match(X.shape[0], len(y), len(groups), (f"features {path}", f"targets {args.targets}", f"groups {args.groups}"))
    if args.target_kind == "regression":
        stacked = P.stack_shuffles(y, groups, args.n_shuffles, args.seed, order)
        rec = P.regression_probe(
            P.array_batches(X, args.batch_size),
            P.array_join(stacked, groups),
            split,
            n_targets=y.shape[1],
            n_shuffles=args.n_shuffles,
            alphas=args.alphas,
            random_features=args.random_features,
            seed=args.seed,
            compute_dtype=np.dtype(args.compute_dtype),
            target_names=names,
            progress=args.progress,
            total_rows=X.shape[0],
            test_batches=lambda: P.array_batches(X, args.batch_size),
        )
    else:
        rec = P.classification_probe(np.asarray(X, np.float64), y, groups, split, Cs=args.cs, n_shuffles=args.n_shuffles, random_features=args.random_features, seed=args.seed, order=order)
    return {"layer": name, "file": path, "target_names": names, **rec}


def run_inlp(args: Args, out_dir: str, name: str, path: str, y: np.ndarray, groups: np.ndarray, order: np.ndarray | None, split: P.GroupSplit) -> dict:
    X = load_array(path, f"features ({name})", mmap=True)
    S = max(args.n_shuffles, 2)
    if args.target_kind == "regression":
        stacked = P.stack_shuffles(y, groups, S, args.seed, order)
        stats, _ = P.accumulate_stats(P.array_batches(X, args.batch_size), P.array_join(stacked, groups), split, n_targets=stacked.shape[1], compute_dtype=np.dtype(args.compute_dtype), progress=args.progress, total_rows=X.shape[0], desc=f"INLP stats {name}")
        res = I.inlp_from_stats(stats, n_targets=y.shape[1], n_shuffles=S, alphas=args.alphas, max_iter=args.inlp_max_iter, z=args.inlp_z, tol=args.inlp_tol, progress=args.progress)
    else:
        res = I.inlp_classification(np.asarray(X, np.float64), y, groups, split, Cs=args.cs, n_shuffles=S, max_iter=args.inlp_max_iter, z=args.inlp_z, tol=args.inlp_tol, seed=args.seed, order=order, progress=args.progress)
    out = {**res.to_json(), "layer": name, "file": path}
    np.save(os.path.join(out_dir, "inlp_basis.npy"), res.basis.astype(np.float32))
    I.plot_inlp(res, os.path.join(out_dir, "inlp.png"), f"INLP on layer {name}: {res.stop_reason} after removing rank {res.basis.shape[1]}")
    P.write_json_atomic(os.path.join(out_dir, "inlp_results.json"), out)
    return out


def main(args: Args) -> int:
    out_dir, results_name = (os.path.dirname(args.out) or ".", os.path.basename(args.out)) if args.out.endswith(".json") else (args.out, "probe_results.json")
    # Validate every input before writing anything.
    paths = resolve_features(args.features)
    names = list(args.layer_names) or [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"--layer-names gives {len(names)} names for {len(paths)} features files: {paths}")
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique; found {names}")
    y_raw = load_array(args.targets, "targets")
    groups = load_array(args.groups, "groups")
    if groups.ndim != 1:
        raise P.ProbeInputError(f"groups {args.groups} must be 1-D (one id per row); found shape {groups.shape}")
    y, col_names = prepare_targets(args, y_raw)
    order = load_array(args.order, "order") if args.order else None
    for p in paths:
        shape = load_array(p, "features", mmap=True).shape
        if len(shape) != 2:
            raise P.ProbeInputError(f"features {p} must be (n, d); found shape {shape}")
        P.check_rows_match(shape[0], len(y), len(groups), (f"features {p}", f"targets {args.targets}", f"groups {args.groups}"))
    if order is not None and order.shape != groups.shape:
        raise P.ProbeInputError(f"order {args.order} has shape {order.shape}; expected {groups.shape}")
    strata = load_array(args.strata, "strata") if args.strata else None
    if strata is None and args.target_kind != "regression":
        _, gi = np.unique(groups, return_inverse=True)
        _, yi = np.unique(y, return_inverse=True)
        if len(np.unique(np.stack([gi, yi], 1), axis=0)) == len(np.unique(gi)):
            strata = y  # label constant within every group (e.g. task id): balance classes over folds
    split = P.make_group_split(groups, args.n_folds, args.test_fraction, args.seed, strata)

    def compute(name: str, path: str) -> dict:
        return probe_layer(args, name, path, y, groups, order, split, col_names)

    layers = P.run_layers(out_dir, run_settings(args, paths, names), list(zip(names, paths)), compute,
                          args.shard_index, args.num_shards, args.overwrite)
    if layers is None:
        return 0
    if args.target_kind == "regression":
        best = max(layers, key=lambda l: -np.inf if l["cv"]["r2_mean_at_best"] is None else l["cv"]["r2_mean_at_best"])
    else:
        best = min(layers, key=lambda l: min(v for v in l["cv"]["log_loss_mean"] if v is not None))
    summary = {
        "schema": SCHEMA,
        "target_kind": args.target_kind,
        "target_names": col_names,
        "config": settings_of(args),
        "n_rows": int(len(y)),
        "split": split.to_json(),
        "best_layer": best["layer"],
        "best_layer_rule": "highest CV R^2 (regression) / lowest CV log-loss (classification); never the test score",
        "layers": layers,
        "cv": best["cv"],
        "train": best["train"],
        "test": best["test"],
        "baselines": best["baselines"],
    }
    plots = P.plot_layer_sweep(layers, "regression" if args.target_kind == "regression" else "classification", out_dir)
    summary["plots"] = plots
    if args.inlp:
        lname = args.inlp_layer or best["layer"]
        if lname not in names:
            raise ValueError(f"--inlp-layer {lname!r} is not one of {names}")
        i = names.index(lname)
        inl = run_inlp(args, out_dir, lname, paths[i], y, groups, order, split)
        summary["inlp"] = {"file": "inlp_results.json", "layer": lname, "stop_reason": inl["stop_reason"], "total_rank_removed": inl["total_rank_removed"]}
    P.write_json_atomic(os.path.join(out_dir, results_name), summary)
    print(json.dumps({"out": os.path.join(out_dir, results_name), "best_layer": best["layer"], "test": best["test"]}, default=str)[:2000])
    return 0
