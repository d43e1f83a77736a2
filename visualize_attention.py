"""Visual attention of the action tokens: camera heatmaps over frames, modality fractions, evolution plots.

    python visualize_attention.py --attention A.npy --spans SPANS.json --frames F.npz --out DIR \
        [--axes steps,layers,heads,queries,keys] [--layers 10 11] [--heads 0] [--steps -1] [--queries 0 1]

A.npy holds attention probabilities with the named axes of --axes (keys last, one entry per key of the joint
sequence described by SPANS.json). With a leading ``time`` axis (one policy call per frame) every time entry
gets an overlay and the run gets an MP4 and an evolution plot. F.npz: ``agentview`` / ``wrist`` frames
(T, H, W, 3) uint8, as the policy saw them (--rotate-180 for raw LIBERO renders).

Writes DIR/overlays/t<frame>.png, DIR/attention_summary.json, DIR/per_layer.png (with several layers),
and with several time entries DIR/attention.mp4 and DIR/evolution.png. Reductions: mean over the selected
steps, heads and queries (and layers for overlays and the overall numbers).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys

import numpy as np
import tyro

from openpi.interp import attention as A
from openpi.interp import attention_plots as plots


@dataclasses.dataclass(kw_only=True)
class Args(A.AttentionInputs):
    frames: pathlib.Path
    """frames .npz with keys agentview / wrist."""
    out: pathlib.Path
    """output folder."""
    frame_index: int | None = None
    """frame to use when the attention has no time axis and the frames file holds several."""
    rotate_180: bool = False
    """rotate frames by 180 degrees (raw LIBERO renders; the policy input is rotated)."""
    overlay_every: int = 1
    """write an overlay PNG for every n-th time entry (the MP4 gets all of them)."""
    fps: float = 10.0
    alpha: float = 0.5
    cmap: str = "jet"


def main(args: Args) -> None:
    if args.overlay_every < 1:
        raise ValueError(f"--overlay-every must be >= 1, found {args.overlay_every}")
    att, table = args.load()
    labels = args.labels(att)
    frames, frame_idx = A.select_frames(A.load_frames(args.frames, args.rotate_180), att.size("time"),
                                        args.times, args.frame_index)
    cams = [c for c in table.valid_cameras if c in frames]
    if not cams:
        raise ValueError(f"{args.frames} holds no frames for the valid cameras {list(table.valid_cameras)}")
    summary = A.attention_summary(att, table, labels)
    rows = att.mean("steps", "heads", "queries", "layers").data  # (T, keys)
    overlay_frames = []
    for t, fi in enumerate(frame_idx):
        heat = A.camera_heatmaps(rows[t], table, cams)
        shares = {c: float(rows[t][table.indices(c)].sum()) for c in cams}
        frame_t = {c: frames[c][t] for c in cams}
        if t % args.overlay_every == 0:
            plots.plot_camera_overlays(frame_t, heat, args.out / "overlays" / f"t{fi:04d}.png",
                                       title=f"frame {fi}", shares=shares, cmap=args.cmap, alpha=args.alpha)
        overlay_frames.append(plots.side_by_side([plots.overlay(frame_t[c], heat[c], args.cmap, args.alpha)
                                                  for c in cams]))
    names = [*cams, "instruction", "template", "state", "actions"]
    if len(labels["layers"]) > 1:
        by_layer = A.modality_summary(att.mean("time", "steps", "heads", "queries").data, table)
        plots.plot_evolution(np.array(labels["layers"]), {n: by_layer[f"fraction/{n}"] for n in names},
                             args.out / "per_layer.png", xlabel="layer", title="mean over frames")
    if len(frame_idx) > 1:
        over_time = A.modality_summary(rows, table)
        plots.plot_evolution(np.array(frame_idx), {n: over_time[f"fraction/{n}"] for n in names},
                             args.out / "evolution.png", xlabel="frame")
        plots.write_mp4(overlay_frames, args.out / "attention.mp4", fps=args.fps)
    A.write_json(args.out / "attention_summary.json",
                 {"inputs": {"attention": str(args.attention), "spans": str(args.spans), "frames": str(args.frames)},
                  "selection": args.selection(), "frame_indices": frame_idx, "cameras": cams, **summary})
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
