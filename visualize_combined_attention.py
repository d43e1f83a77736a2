"""Combined multimodal view: camera overlays, per-token text attention and modality fractions in one figure.

    python visualize_combined_attention.py --attention A.npy --spans SPANS.json --frames F.npz \
        --tokens TOKENS.json --out DIR [--env-steps KEYS.npz | --env-step N] [--axes ...] [--layers ...] \
        [--heads ...] [--steps ...] [--queries ...]

Inputs as in visualize_attention.py (attention, span table, frames joined on env step) and
visualize_text_attention.py (tokens).
Writes DIR/combined/s<env_step>.png per time entry and DIR/combined_summary.json (the modality summary of
visualize_attention.py: per-time masses, fractions, visual/linguistic ratio, per-layer and per-step entries).
Reductions: mean over the selected steps, heads, queries and layers.
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
    tokens: pathlib.Path
    """JSON list of decoded token strings for the prompt positions."""
    out: pathlib.Path
    """output folder."""
    rotate_180: bool = False
    """rotate frames by 180 degrees (raw LIBERO renders; the policy input is rotated)."""
    alpha: float = 0.5
    cmap: str = "jet"


def main(args: Args) -> None:
    att, table = args.load()
    labels = args.labels(att)
    tokens = A.align_tokens(A.load_tokens(args.tokens), table, source=str(args.tokens))
    frames, env_steps = A.select_frames(A.load_frames(args.frames, args.rotate_180),
                                        A.load_frame_env_steps(args.frames), args.time_env_steps(att), str(args.frames))
    cams = [c for c in table.valid_cameras if c in frames]
    if not cams:
        raise ValueError(f"{args.frames} holds no frames for the valid cameras {list(table.valid_cameras)}")
    kinds = A.token_kinds(table)
    keep = np.array([k != "pad" for k in kinds])
    shown_tokens = [t for t, k in zip(tokens, kinds) if k != "pad"]
    shown_kinds = [k for k in kinds if k != "pad"]
    summary = A.attention_summary(att, table, labels)
    rows = att.mean("steps", "heads", "queries", "layers").data  # (T, keys)
    for t, step in enumerate(env_steps):
        weights, _ = A.text_weights(rows[t], table)
        fractions = summary["per_time"][t]["fraction"]
        shown = {n: float(fractions[n]) for n in [*cams, "instruction", "template", "state", "actions"]}
        plots.plot_combined({c: frames[c][t] for c in cams}, A.camera_heatmaps(rows[t], table, cams),
                            weights[keep], shown_tokens, shown, args.out / "combined" / f"{A.step_file_stem(step)}.png",
                            kinds=shown_kinds, title=f"{A.step_title(step)}; {args.describe(att)}", cmap=args.cmap,
                            alpha=args.alpha)
    A.write_json(args.out / "combined_summary.json",
                 {"inputs": {"attention": str(args.attention), "spans": str(args.spans), "frames": str(args.frames),
                             "tokens": str(args.tokens)},
                  "selection": args.selection(), "env_steps": env_steps, "cameras": cams, **summary})
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
