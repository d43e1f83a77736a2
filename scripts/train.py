"""Flow-matching training of a Pi0-family policy on scripted (or any format-conforming) LIBERO demos.

    # tiny CPU model (pi0_tiny_spatial, the default) from scratch on generated demos
    python scripts/train.py --demo-dirs data/demos/libero_spatial --out-dir checkpoints/pi0_tiny_spatial
    # resume after a kill: run the same command again (other settings are refused, naming each; --overwrite
    # starts over)
    # serve the result: every checkpoint folder is servable
    python scripts/serve_policy.py policy:checkpoint --policy.config pi0_tiny_spatial \
        --policy.dir checkpoints/pi0_tiny_spatial/checkpoints/00002000
    # a tiny Diffusion Policy on the same demos (LeRobot-layout checkpoints; docs/diffusion_policy.md)
    python scripts/train.py --policy-config dp_tiny_spatial10 --demo-dirs data/demos/libero_spatial \
        --out-dir checkpoints/dp --num-steps 4000 --batch-size 32 --warmup-steps 200
    # fine-tune a released openpi checkpoint (GPU, memory-heavy; see docs/training.md)
    python scripts/train.py --policy-config pi0_libero --init-checkpoint /ckpt/pi0_base \
        --tokenizer /ckpt/paligemma_tokenizer.model --peak-lr 2.5e-5 --end-lr 2.5e-6 --warmup-steps 1000 \
        --num-steps 30000 --batch-size 32 --demo-dirs data/demos/libero_spatial --out-dir checkpoints/pi0_ft

Outputs: ``openpi.training.train`` module docstring and docs/training.md. The last printed line is one JSON object
(step, first_loss, final_loss, steps_per_s, checkpoint, num_params).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Annotated

import tyro

from openpi.shared.io import jsonable
from openpi.training import train


@dataclasses.dataclass
class Args:
    config: Annotated[train.TrainConfig, tyro.conf.OmitArgPrefixes]
    stop_at: int | None = None
    """Stop (with a checkpoint) at this step without changing the schedule; rerun without it to continue."""


def main(args: Args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train.train(args.config, stop_at=args.stop_at)
    print(json.dumps(jsonable(result)))  # the project's JSON policy: NaN -> null
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
