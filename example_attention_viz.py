"""Look at the attention of a recorded run: one policy query or a whole episode, image / text / combined views.

    python example_attention_viz.py --store STORE --rollouts ROLLOUTS --out OUT \
        [--run-id R --suite S --task-id T --episode E] [--env-step N] [--mode image|text|combined|all] \
        [--layers ...] [--heads ...] [--steps ...] [--queries ...] [--video] [--tokens T.json | --tokenizer M.model]

Joins store rows with the rollout frames (openpi.interp.recorded_run); defaults to the first recorded episode and,
without ``--env-step``, every policy query of it. Attention is the mean over the selected denoising steps,
layers, heads (``--heads`` needs a recording without ``reduce=heads``) and action queries. Figures come from
openpi.interp.attention_plots.

Outputs (OUT/): ``image/s<env_step>.png`` (valid cameras with heatmap overlays on one colour scale with a colour
bar, the objects of interest outlined; titles name env step, layers, denoising steps, heads), ``text/s<env_step>.png``
(attention per prompt token), ``combined/s<env_step>.png``, with ``--video`` ``image.mp4``, and ``viz.json``:
{episode, selection {layers, heads, steps, queries}, queries [{env_step, frame_row, fraction {SPAN: ...},
visual_linguistic_ratio, top_patch (row-major index of the scored camera's most attended patch), tokens,
text_weights (share of the full row per non-pad prompt token)}], warnings}.
A Diffusion Policy recording (``enc.<cam>.attn``): the image view only, each camera's spatial-softmax grid drawn
over the part of the frame its crop covers, keypoints in place of heads (``--heads`` selects keypoints), and
``fraction`` and ``visual_linguistic_ratio`` null (each camera's softmax sums to 1 on its own).
Token labels: ``--tokens`` (JSON list, as for visualize_text_attention.py), else ``--tokenizer`` (SentencePiece
model; Pi0 prompts only), else positional labels ``i0, i1, ...`` (instruction) and ``t0, ...`` (template).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import textwrap
from typing import Literal

import numpy as np
import tyro

from openpi.interp import attention as A
from openpi.interp import attention_plots as plots
from openpi.interp.bridges import prompt_tokens
from openpi.interp.recorded_run import EpisodeKey, JoinError, PolicyQuery, RecordedRun


@dataclasses.dataclass
class Args:
    store: pathlib.Path
    """activation store with llm.layer.<i>.attn.probs rows."""
    rollouts: pathlib.Path
    """rollout folder written with --save-frames."""
    out: pathlib.Path
    mode: Literal["image", "text", "combined", "all"] = "all"
    run_id: str | None = None
    suite: str | None = None
    task_id: int | None = None
    episode: int | None = None
    """episode selection (default: the first recorded episode matching the given fields)."""
    env_step: int | None = None
    """one policy query (default: every query of the episode)."""
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    """head indices (needs a per-head recording: no reduce=heads)."""
    steps: tuple[int, ...] | None = None
    """denoising steps as stored (default all recorded)."""
    queries: tuple[int, ...] | None = None
    """indices into the action queries (default all)."""
    camera: Literal["base_0_rgb", "left_wrist_0_rgb"] = "base_0_rgb"
    """camera whose most attended patch is reported."""
    video: bool = False
    """write image.mp4 over the selected queries."""
    tokens: pathlib.Path | None = None
    tokenizer: pathlib.Path | None = None
    alpha: float = 0.5
    cmap: str = "jet"


def pick_episode(run: RecordedRun, args: Args) -> EpisodeKey:
    keys = run.episode_keys()
    wanted = {"run_id": args.run_id, "suite": args.suite, "task_id": args.task_id, "episode": args.episode}
    match = [k for k in keys if all(v is None or getattr(k, f) == v for f, v in wanted.items())]
    if not match:
        raise JoinError(f"no recorded episode matches {({k: v for k, v in wanted.items() if v is not None})}; "
                        f"recorded: {[k.stem for k in keys][:10]}")
    return match[0]


def reduce_query(q: PolicyQuery, args: Args) -> np.ndarray:
    """(keys,) row: the selected heads and action queries, averaged with steps and layers."""
    att = A.AttentionArray(q.attention, q.axes)
    if args.heads is not None and not q.per_head:
        raise ValueError("--heads needs a per-head recording (record without reduce=heads); this store has "
                         "head-averaged rows")
    att = att.select(heads=args.heads, queries=args.queries)
    return att.mean("steps", "layers", "heads", "queries").data


def token_labels(q: PolicyQuery, args: Args) -> list[str]:
    table = q.table
    if args.tokens is not None:
        return A.align_tokens(A.load_tokens(args.tokens), table, source=str(args.tokens))
    return prompt_tokens(table, q.prompt, args.tokenizer)[0]  # positional labels without --tokenizer


def _modes(args: Args, diffusion: bool) -> tuple[str, ...]:
    if diffusion and args.mode in ("text", "combined"):
        raise ValueError(f"--mode {args.mode}: a Diffusion Policy reads no prompt, so its attention has no text part; "
                         "use --mode image (or all)")
    if args.mode != "all":
        return (args.mode,)
    return ("image",) if diffusion else ("image", "text", "combined")


def main(args: Args) -> dict:
    run = RecordedRun(args.store, args.rollouts, layers=args.layers, steps=args.steps)
    key = pick_episode(run, args)
    queries = run.episode_queries(key)
    if args.env_step is not None:
        queries = [q for q in queries if q.env_step == args.env_step]
        if not queries:
            raise JoinError(f"episode {key.stem} has no policy query at env_step {args.env_step}")
    diffusion = queries[0].table.model == "diffusion"
    modes = _modes(args, diffusion)
    heads_word = "keypoints" if diffusion else "heads"
    results, movie, warnings = [], [], []
    for q in queries:
        table = q.table
        row = reduce_query(q, args)
        cams = [c for c in table.valid_cameras if c in q.frames]
        grids = A.camera_heatmaps(row, table, cams)
        # A Diffusion Policy's grid covers its crop of the frame only: place it there (Pi0's covers the frame).
        heat = {c: h if q.grid_geometry(c).whole_frame else q.grid_geometry(c).frame_heatmap(h, q.frames[c].shape[:2])
                for c, h in grids.items()}
        summary = A.modality_summary(row, table)
        fractions = {k.split("/", 1)[1]: float(v) for k, v in summary.items() if k.startswith("fraction/")}
        head = f"{key.stem}, env step {q.env_step} ({'success' if q.success else 'failure'}): {q.prompt!r}"
        title = (textwrap.shorten(head, 46 * len(cams), placeholder="...") + "\n"  # one line; the whole: viz.json
                 f"layers {A.ranges_label(q.layers)}, denoising steps {A.ranges_label(q.steps)}, {heads_word} "
                 f"{'mean' if args.heads is None else A.ranges_label(args.heads)} (mean)")
        name = f"{A.step_file_stem(q.env_step)}.png"
        objects = sorted(set(q.object_ids.values()))
        outlines = {c: np.isin(q.masks[c], objects) for c in cams if c in q.masks and objects}
        if "image" in modes:
            plots.plot_camera_overlays({c: q.frames[c] for c in cams}, heat, args.out / "image" / name,
                                       title=title, shares=None if diffusion else {c: fractions[c] for c in cams},
                                       cmap=args.cmap,
                                       alpha=args.alpha, outlines=outlines)
        labels, weights, shown_kinds = [], np.zeros(0), []
        if not diffusion:
            kinds = A.token_kinds(table)
            keep = [k != "pad" for k in kinds]
            labels = [t for t, k in zip(token_labels(q, args), keep) if k]
            weights = A.text_weights(row, table)[0][np.asarray(keep)]
            shown_kinds = [k for k in kinds if k != "pad"]
        if "text" in modes:
            plots.plot_text_attention(weights, labels, args.out / "text" / name, kinds=shown_kinds, title=title)
        if "combined" in modes:
            shown = {n: fractions[n] for n in [*cams, "instruction", "template", "state", "actions"]}
            plots.plot_combined({c: q.frames[c] for c in cams}, heat, weights, labels, shown,
                                args.out / "combined" / name, kinds=shown_kinds, title=title, cmap=args.cmap,
                                alpha=args.alpha, outlines=outlines)
        if args.video:
            top = plots.shared_vmax(heat)
            movie.append(plots.side_by_side([plots.overlay(q.frames[c], heat[c], args.cmap, args.alpha, vmax=top)
                                             for c in cams]))
        if not diffusion:
            warnings += [f"env_step {q.env_step}: {w}" for w in A.sanity_warnings(A.modality_masses(row, table), table)]
        # A DP row holds each camera's own softmax side by side: shares of the row would only count cameras.
        results.append({"env_step": q.env_step, "frame_row": q.frame_row, "fraction": None if diffusion else fractions,
                        "visual_linguistic_ratio": None if diffusion else float(summary["visual_linguistic_ratio"]),
                        "top_patch": int(np.argmax(A.camera_probs(row, table, args.camera))),
                        "tokens": labels, "text_weights": weights})
    if args.video and movie:
        plots.write_mp4(movie, args.out / "image.mp4", fps=5)
    info = {"episode": key.stem, "prompt": queries[0].prompt, "success": queries[0].success,
            "selection": {"layers": queries[0].layers, "heads": args.heads, "steps": queries[0].steps,
                          "queries": args.queries, "reduction": f"mean over selected steps, layers, {heads_word}, "
                          "action queries"}, "model": "diffusion" if diffusion else "pi0", "queries": results,
            "warnings": warnings}
    A.write_json(args.out / "viz.json", info)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out} ({len(results)} policy queries of {key.stem})")
    return info


if __name__ == "__main__":
    main(tyro.cli(Args))
