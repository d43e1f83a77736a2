"""Export one site of an activation store to plain arrays (X.npy + keys + targets joined from rollouts).

    python export_activations.py --store out/store --site llm.expert1.layer.3.resid_post \
        --episodes-dir out/rollouts --denoise-step 9 --out out/export/layer3

Outputs are documented in openpi.interp.export. Every plain-array script (train_save.py, linear_probe.py, ...)
then runs on the export.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import tyro

from openpi.interp.export import export_site


@dataclasses.dataclass
class Args:
    store: pathlib.Path
    site: str
    out: pathlib.Path
    episodes_dir: pathlib.Path | None = None
    """LIBERO client output folder (with episodes/); adds actions/states/task/success targets joined by key"""
    denoise_step: int | None = None
    """keep only rows of this denoising step (e.g. 9 = the last of 10)"""
    span: str | None = None
    """keep only rows of this token span (e.g. actions)"""


def main(args: Args) -> None:
    where = {}
    if args.denoise_step is not None:
        where["denoise_step"] = args.denoise_step
    if args.span is not None:
        where["span"] = args.span
    summary = export_site(args.store, args.site, args.out, where=where or None, episodes_dir=args.episodes_dir)
    print(json.dumps(summary))


if __name__ == "__main__":
    main(tyro.cli(Args))
