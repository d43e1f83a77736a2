"""Attention-object IoU and modality analysis of a recorded LIBERO run (activation store + rollout folder).

    python evaluate_attention_iou.py --store STORE --rollouts ROLLOUTS --out OUT \
        [--layers 0 1] [--steps -1 ...] [--camera base_0_rgb|left_wrist_0_rgb] [--overlays [--overlay-every N]]
        [--video]

Thin CLI over :func:`openpi.interp.recorded_iou.evaluate_run`; the output files (``episodes/<stem>.json``,
``summary_tasks.csv``, ``summary_suites.csv``, ``summary.json``, figures, overlays, videos) and their fields are
documented in that module's docstring and in ATTENTION_VIZ_README.md. Diffusion Policy stores (``--record
'enc.*.attn'``) are read too: keypoints as heads, one pseudo-layer ``encoder``, modality fractions null (notes
printed). ``--shard-index/--num-shards`` split
episodes; a killed run resumes (finished episodes are skipped); OUT/run.json holds the settings, and a rerun with
other settings is refused naming each difference (``--overwrite`` starts over).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Literal

import tyro

from openpi.interp import recorded_iou


@dataclasses.dataclass
class Args:
    store: pathlib.Path
    """activation store written by scripts/serve_policy.py --record-dir (needs llm.layer.<i>.attn.probs; a Diffusion
    Policy's: enc.<cam>.attn)."""
    rollouts: pathlib.Path
    """rollout folder written by examples/libero/main.py --save-frames (episodes/, frames/)."""
    out: pathlib.Path
    """output folder."""
    layers: tuple[int, ...] | None = None
    """layer indices (default: every recorded layer; a Diffusion Policy has one pseudo-layer, leave unset)."""
    steps: tuple[int, ...] | None = None
    """denoising steps to average (as stored: 0 = first; default every recorded step). Pi0-FAST recordings: decoding
    steps, of which only those that generated an action token are scored."""
    camera: Literal["base_0_rgb", "left_wrist_0_rgb"] = "base_0_rgb"
    """camera whose attention is scored against its instance mask (a Diffusion Policy's agent view is base_0_rgb,
    its wrist camera left_wrist_0_rgb)."""
    overlays: bool = False
    """write an overlay PNG per policy query."""
    overlay_every: int = 1
    """with --overlays, draw every N-th query of each episode (the first always)."""
    video: bool = False
    """write an MP4 of overlays per episode."""
    percentile: float = 90.0
    sigma_frac: float = 0.25
    n_boot: int = 1000
    """bootstrap resamples (episodes are resampled) for the summary CIs."""
    seed: int = 0
    on_missing: Literal["error", "skip"] = "error"
    """store episodes without episode record / frames file: stop with an error, or skip with a warning."""
    shard_index: int = 0
    num_shards: int = 1
    overwrite: bool = False
    """start over in --out (a rerun with other settings is refused otherwise)."""


def main(args: Args) -> dict:
    summary = recorded_iou.evaluate_run(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)})
    for n in summary.get("notes", []):
        print(f"note: {n}", file=sys.stderr)
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}: {summary['counts']['episodes']} episodes, {summary['counts']['queries']} queries")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
