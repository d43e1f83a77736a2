"""Attention-object IoU: how much of one camera's attention lands on the task objects, with baselines and CIs.

    python attention_iou.py --attention ATT.npy --masks MASKS.npy [--grid 8] [--objects 3 7] --out DIR

ATT.npy: (N, grid*grid) float (the grid side is read from the data: the square root of the patches per row, e.g.
8 for the default pi0_tiny_spatial, 16 for Pi0 at 224 px; --grid only checks it), one camera's share of full attention rows in row-major patch order (rows are
renormalised within the camera; a negative, all-zero or non-finite row is an error, and with
--require-normalised so is a row not summing to 1). MASKS.npy: (N, H, W) integer instance masks of the same
camera, as the policy saw it (0 = background). --groups G.npy: (N,) episode ids to bootstrap over episodes.

Writes DIR/iou.json (schema and metric definitions: ATTENTION_VIZ_README.md and openpi.interp.iou).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys

import numpy as np
import tyro

from openpi.interp import iou
from openpi.interp.attention import write_json


@dataclasses.dataclass
class Args:
    attention: pathlib.Path
    """(N, grid*grid) .npy of one camera's attention probabilities."""
    masks: pathlib.Path
    """(N, H, W) .npy integer instance masks (0 = background)."""
    out: pathlib.Path
    """output folder; iou.json is written there."""
    grid: int | None = None
    """patch grid side (default: read from the data, the square root of the patches per row)."""
    objects: tuple[int, ...] | None = None
    """instance ids of the task objects (default: every non-zero id present)."""
    groups: pathlib.Path | None = None
    """(N,) .npy episode/group ids; bootstrap resamples whole groups."""
    require_normalised: bool = False
    """error unless every attention row sums to 1 (within 1e-3)."""
    percentile: float = 90.0
    """percentile binarisation keeps patches above this percentile (top 10% by default)."""
    sigma_frac: float = 0.25
    """centre-bias baseline: Gaussian sigma as a fraction of the grid side."""
    n_boot: int = 1000
    """bootstrap resamples."""
    seed: int = 0


def _load(path: pathlib.Path, what: str, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as err:
        raise ValueError(f"{what} file {path} could not be read as a plain array ({err}); ragged lists of "
                         "masks of different sizes are not supported: all masks must share one (H, W)") from err


def grid_side(n_patches: int, given: int | None, source: str) -> int:
    """The patch grid side: the square root of the patches per row, checked against ``--grid`` when given."""
    if given is not None:
        if n_patches != given ** 2:
            raise ValueError(f"attention {source} has {n_patches} patches per row, but --grid {given} means "
                             f"{given}x{given} = {given ** 2}")
        return given
    side = int(round(n_patches ** 0.5))
    if side * side != n_patches:
        raise ValueError(f"attention {source} has {n_patches} patches per row, not a square grid; pass --grid")
    return side


def run(args: Args) -> dict:
    """Validate every input before touching DIR, then compute and write iou.json."""
    att = _load(args.attention, "attention")
    masks = _load(args.masks, "masks", mmap=True)
    if att.ndim != 2:
        raise ValueError(f"attention {args.attention}: expected shape (N, grid*grid), found {att.shape}")
    side = grid_side(att.shape[1], args.grid, str(args.attention))
    grid = (side, side)
    if masks.ndim != 3:
        raise ValueError(f"masks {args.masks}: expected shape (N, H, W), found {masks.shape}")
    if not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(f"masks {args.masks}: expected integer instance ids, found dtype {masks.dtype}")
    if masks.shape[0] != att.shape[0]:
        raise ValueError(f"attention {args.attention} has N={att.shape[0]} frames but masks {args.masks} has "
                         f"N={masks.shape[0]}")
    iou.validate_attention(att, args.require_normalised, source=f"attention {args.attention}")
    groups = None
    if args.groups is not None:
        groups = _load(args.groups, "groups")
        if groups.shape != (att.shape[0],):
            raise ValueError(f"groups {args.groups} has shape {groups.shape}, expected ({att.shape[0]},)")

    if args.objects is not None and 0 in args.objects:
        raise ValueError("--objects 0 selects the background (id 0), not an object")
    present = iou.present_ids(masks)
    ids = list(args.objects) if args.objects is not None else present
    missing = [i for i in ids if i not in present]
    if not ids or len(missing) == len(ids):
        raise ValueError(f"none of the selected object ids {ids} occur in masks {args.masks} "
                         f"(ids present: {present})")
    warnings = [f"object id {i} never occurs in the masks" for i in missing]
    coverage = iou.pool_objects(masks, [i for i in ids if i not in missing], grid)
    report = iou.iou_report(att, coverage, grid, groups, args.percentile, args.sigma_frac, args.n_boot, args.seed)
    if report["counts"]["n_excluded_empty_mask"]:
        warnings.append(f"{report['counts']['n_excluded_empty_mask']} frame(s) have no selected object pixel "
                        "and are excluded from the aggregates")
    over = att.sum(axis=1) > 1 + 1e-3
    if over.any():
        warnings.append(f"{int(over.sum())} attention row(s) give the camera more than 1 of the row: "
                        "are these probabilities?")
    out = {
        "schema_version": 1,
        "inputs": {"attention": str(args.attention), "masks": str(args.masks),
                   "groups": None if args.groups is None else str(args.groups), "grid": list(grid),
                   "percentile": args.percentile, "sigma_frac": args.sigma_frac, "n_boot": args.n_boot,
                   "seed": args.seed, "require_normalised": args.require_normalised},
        "objects": [i for i in ids if i not in missing],
        "objects_missing": missing,
        "warnings": warnings,
        **report,
    }
    write_json(args.out / "iou.json", out)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    agg = report["aggregate"]
    print(f"wrote {args.out / 'iou.json'}: {report['counts']['n_used']}/{att.shape[0]} frames; "
          f"soft mass {agg['soft_mass']['mean']:.3f}, IoU(top-k) {agg['iou_topk']['mean']:.3f}, "
          f"pointing {agg['pointing_accuracy']['mean']:.3f}")
    return out


if __name__ == "__main__":
    run(tyro.cli(Args))
