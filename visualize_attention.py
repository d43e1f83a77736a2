"""Visual attention of the action tokens: camera heatmaps over frames, modality fractions, evolution plots.

    python visualize_attention.py --attention A.npy --spans SPANS.json --frames F.npz --out DIR \
        [--env-steps KEYS.npz | --env-step N] [--axes time,steps,layers,heads,queries,keys] [--layers 10 11] \
        [--heads 0] [--steps -1] [--queries 0 1]

A.npy holds attention probabilities with the named axes of --axes (keys last, one entry per key of the joint
sequence described by SPANS.json). With a leading ``time`` axis (one policy call per entry) every time entry
gets an overlay and the run gets an MP4 and an evolution plot. F.npz: ``agentview`` / ``wrist`` frames
(T, H, W, 3) uint8, as the policy saw them (--rotate-180 for raw LIBERO renders), with their ``env_step`` array
(the rollout's frames file). Frames are joined with the attention on env step (``--env-steps``: one per time
entry; ``--env-step``: an array without a time axis), never by position; a missing env step is an error.

Writes DIR/overlays/s<env_step>.png (cameras on one colour scale with a colour bar; titles name the env step,
layers and denoising steps), DIR/attention_summary.json, DIR/per_layer.png (with several layers), and with
several time entries DIR/attention.mp4 and DIR/evolution.png (over env steps). Reductions: mean over the selected
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
    frames, env_steps = A.select_frames(A.load_frames(args.frames, args.rotate_180),
                                        A.load_frame_env_steps(args.frames), args.time_env_steps(att), str(args.frames))
    cams = [c for c in table.valid_cameras if c in frames]
    if not cams:
        raise ValueError(f"{args.frames} holds no frames for the valid cameras {list(table.valid_cameras)}")
    summary = A.attention_summary(att, table, labels)
    rows = att.mean("steps", "heads", "queries", "layers").data  # (T, keys)
    overlay_frames = []
    for t, step in enumerate(env_steps):
        heat = A.camera_heatmaps(rows[t], table, cams)
        shares = {c: float(rows[t][table.indices(c)].sum()) for c in cams}
        frame_t = {c: frames[c][t] for c in cams}
        if t % args.overlay_every == 0:
            plots.plot_camera_overlays(frame_t, heat, args.out / "overlays" / f"{A.step_file_stem(step)}.png",
                                       title=f"{A.step_title(step)}; {args.describe(att)}", shares=shares,
                                       cmap=args.cmap, alpha=args.alpha)
        top = plots.shared_vmax(heat)
        overlay_frames.append(plots.side_by_side([plots.overlay(frame_t[c], heat[c], args.cmap, args.alpha, vmax=top)
                                                  for c in cams]))
    names = [*cams, "instruction", "template", "state", "actions"]
    if len(labels["layers"]) > 1:
        by_layer = A.modality_summary(att.mean("time", "steps", "heads", "queries").data, table)
        plots.plot_evolution(np.array(labels["layers"]), {n: by_layer[f"fraction/{n}"] for n in names},
                             args.out / "per_layer.png", xlabel="layer",
                             title=f"mean over {len(env_steps)} env step(s) and denoising steps "
                                   f"{A.ranges_label(labels['steps'])}")
    if len(env_steps) > 1:
        over_time = A.modality_summary(rows, table)
        plots.plot_evolution(np.array(env_steps), {n: over_time[f"fraction/{n}"] for n in names},
                             args.out / "evolution.png", xlabel="env step", title=args.describe(att))
        plots.write_mp4(overlay_frames, args.out / "attention.mp4", fps=args.fps)
    A.write_json(args.out / "attention_summary.json",
                 {"inputs": {"attention": str(args.attention), "spans": str(args.spans), "frames": str(args.frames)},
                  "selection": args.selection(), "env_steps": env_steps, "cameras": cams, **summary})
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
