"""Export one site of an activation store to plain arrays, joined by key with the LIBERO client's rollouts.

    python export_activations.py --store out/store --site llm.expert1.layer.3.resid_post \
        --rollouts out/rollouts --denoise-step 9 --out out/export/layer3
    python export_activations.py --store out/store --site llm.layer.11.attn.probs --rollouts out/rollouts \
        --select episode=0 --out out/export/attn11

``--rollouts`` is the client's ``--out-dir`` (the folder holding episodes/ and frames/). The whole OUT folder is
written at once (a failed export leaves the previous one untouched) after every input has been checked. Outputs
and label rule: openpi.interp.export; the inputs of linear_probe.py, geometry.py, action_pca.py,
attention_iou.py and visualize_*.py and the commands that run them on this export: OUT/bridge.json
(openpi.interp.bridges).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import tyro

from openpi.interp.export import export_site
from openpi.interp.store import parse_filter


@dataclasses.dataclass
class Args:
    store: pathlib.Path
    """activation store folder (the server's --record-dir)"""
    site: str
    """stored site, e.g. llm.expert1.layer.3.resid_post (store.json lists them)"""
    out: pathlib.Path
    rollouts: pathlib.Path | None = None
    """the LIBERO client's output folder (its --out-dir); adds action labels, states, task, success, groups and
    the bridges, joined by key, keeping only rows of the attempt that wrote each episode record"""
    denoise_step: int | None = None
    """keep only rows of this denoising step (e.g. 9 = the last of 10)"""
    span: str | None = None
    """keep only rows of this token span (e.g. actions)"""
    select: tuple[str, ...] = ()
    """more row filters COLUMN=VALUE[,VALUE...] on the store's key columns, e.g. episode=0 task_id=2"""
    bridges: bool = True
    """with --rollouts, also write the inputs of the array scripts (--no-bridges: only the arrays)"""


def main(args: Args) -> dict:
    where = parse_filter(args.select)
    if args.denoise_step is not None:
        where["denoise_step"] = [args.denoise_step]
    if args.span is not None:
        where["span"] = [args.span]
    summary = export_site(args.store, args.site, args.out, where=where or None, rollouts=args.rollouts,
                          bridges=args.bridges)
    print(json.dumps({k: summary[k] for k in ("site", "rows", "width") if k in summary}
                     | {"dropped_stale_rows": summary["attempts"]["dropped_stale_rows"], "out": str(args.out)}))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
