"""Flow-matching training of a Pi0-family policy on scripted (or any format-conforming) LIBERO demos.

    # tiny CPU model (pi0_tiny) from scratch on generated demos
    python scripts/train.py --demo-dirs data/demos/libero_spatial --out-dir checkpoints/pi0_tiny_spatial
    # resume after a kill: run the same command again
    # serve the result
    python scripts/serve_policy.py policy:checkpoint --policy.config pi0_tiny --policy.dir checkpoints/pi0_tiny_spatial/2000
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

import tyro

from openpi.training import train


@dataclasses.dataclass
class Args:
    demo_dirs: tuple[str, ...]
    """Demo roots written by scripts/generate_demos.py (each holds demos/<stem>/)."""
    out_dir: str
    """Checkpoint root: <out>/<step>/params, assets/, train_state; metrics.jsonl; loss.png."""
    policy_config: str = "pi0_tiny"
    """Named policy config (pi0_tiny, pi05_tiny, pi0_libero, pi05_libero): model, normalisation, delta actions."""
    init_checkpoint: str | None = None
    """openpi checkpoint to start from (fine-tuning); default: seeded random weights."""
    tokenizer: str | None = None
    """PaliGemma SentencePiece file for the real configs (or $OPENPI_TOKENIZER, or inside --init-checkpoint)."""
    dtype: str | None = None
    """Compute dtype override (float32 / bfloat16); master weights stay float32."""
    num_steps: int = 2000
    batch_size: int = 8
    peak_lr: float = 3e-4
    end_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 1e-10
    clip_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 500
    keep_last: int | None = 3
    """Keep only the newest N checkpoints (None: all)."""
    log_every: int = 10
    stop_at: int | None = None
    """Stop (with a checkpoint) at this step without changing the schedule; rerun without it to continue."""


def main(args: Args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fields = dataclasses.asdict(args)
    stop_at = fields.pop("stop_at")
    result = train.train(train.TrainConfig(**fields), stop_at=stop_at)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
