"""Linguistic attention of the action tokens: per-token weights over the prompt, per layer, top tokens.

    python visualize_text_attention.py --attention A.npy --spans SPANS.json --tokens TOKENS.json --out DIR \
        [--axes steps,layers,heads,queries,keys] [--layers ...] [--heads ...] [--steps ...] [--queries ...]

TOKENS.json: a JSON list of decoded token strings, one per prompt position of the span table (instruction,
template and pad spans in sequence order) or one per non-pad prompt position. Weights are attention
probabilities (shares of the full row), averaged over the selected time entries, steps, heads and queries.

Writes DIR/text_attention.png (bars, instruction vs template coloured), DIR/text_layer_token.png (layer x token)
and DIR/text_attention.json:
  tokens, kinds, key_index      per non-pad prompt position: decoded string, span name, key index
  weights                       mean attention probability per token
  weights_within_text           the same renormalised over the non-pad prompt tokens
  per_layer                     [{"layer", "weights"}] per selected layer
  top_tokens                    the --top highest-weight instruction tokens: {"token", "key_index", "weight"}
  mass                          {"instruction", "template", "pad"} summed probabilities
  warnings                      e.g. attention on pad tokens
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
    tokens: pathlib.Path
    """JSON list of decoded token strings for the prompt positions."""
    out: pathlib.Path
    """output folder."""
    top: int = 5
    """how many top instruction tokens to list."""


def main(args: Args) -> None:
    att, table = args.load()
    tokens = A.align_tokens(A.load_tokens(args.tokens), table, source=str(args.tokens))
    kinds = A.token_kinds(table)
    by_layer = att.mean("time", "steps", "heads", "queries").data  # (L, keys)
    weights_l, key_idx = A.text_weights(by_layer, table)  # (L, T_prompt)
    keep = np.array([k != "pad" for k in kinds])
    weights_l, key_idx = weights_l[:, keep], key_idx[keep]
    tokens = [t for t, k in zip(tokens, kinds) if k != "pad"]
    kinds = [k for k in kinds if k != "pad"]
    weights = weights_l.mean(axis=0)
    text_total = weights.sum()
    within = weights / text_total if text_total > 0 else np.full_like(weights, np.nan)
    masses = A.modality_masses(by_layer.mean(axis=0), table)
    instr = [i for i, k in enumerate(kinds) if k == "instruction"]
    top = sorted(instr, key=lambda i: -weights[i])[: args.top]
    layers = args.labels(att)["layers"]
    env_steps = args.time_env_steps(att)
    when = "" if env_steps is None else f"env steps {A.ranges_label(env_steps)}; "
    plots.plot_text_attention(weights, tokens, args.out / "text_attention.png", kinds=kinds,
                              title=f"attention over the prompt; {when}{args.describe(att)}")
    plots.plot_layer_token_heatmap(weights_l, tokens, args.out / "text_layer_token.png", layer_labels=layers,
                                   title=f"attention per layer over the prompt; {when}denoising steps "
                                         f"{A.ranges_label(args.labels(att)['steps'])} (mean)")
    warnings = A.sanity_warnings(A.modality_masses(att.data, table), table)
    A.write_json(args.out / "text_attention.json", {
        "inputs": {"attention": str(args.attention), "spans": str(args.spans), "tokens": str(args.tokens)},
        "selection": args.selection(), "env_steps": env_steps,
        "tokens": tokens, "kinds": kinds, "key_index": key_idx, "weights": weights,
        "weights_within_text": within,
        "per_layer": [{"layer": lab, "weights": weights_l[i]} for i, lab in enumerate(layers)],
        "top_tokens": [{"token": tokens[i], "key_index": key_idx[i], "weight": weights[i]} for i in top],
        "mass": {n: masses[n] for n in A.TEXT_SPANS},
        "warnings": warnings,
    })
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}; top instruction tokens: {[tokens[i] for i in top]}")


if __name__ == "__main__":
    main(tyro.cli(Args))
