"""Train a FAST action tokenizer on our demonstrations (or on a .npy of action chunks) and save it to a folder.

Why: Pi0-FAST predicts FAST tokens, and the released tokenizer (physical-intelligence/fast) is fitted on other
robots' data and cannot be downloaded here; a tiny Pi0-FAST trained on our scripted demos needs one fitted on the
chunks it will predict. Chunks are built as training builds targets: ``actions[t : t + horizon]`` (last action
repeated past the episode end), the first 6 dims made relative to the state (``--delta-actions``, openpi's LIBERO
setting) and quantile-normalised to [-1, 1] with the given norm stats (or stats computed from the same demos, saved
next to the tokenizer).

    python scripts/train_fast_tokenizer.py --demos data/demos_spatial --out out/fast_tokenizer
    python scripts/train_fast_tokenizer.py --chunks chunks.npy --out out/fast_tokenizer   # (N, horizon, dim)

The folder (``tokenizer.json`` + ``processor_config.json``) loads with
``openpi.models.fast_tokenizer.FASTTokenizer.load``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import tyro

from openpi.models.fast_tokenizer import FASTTokenizer
from openpi.models.normalize import save_norm_stats
from openpi.training.train import fast_training_chunks


@dataclasses.dataclass
class Args:
    out: pathlib.Path
    """folder to write the tokenizer to"""
    demos: tuple[pathlib.Path, ...] = ()
    """demo roots written by scripts/generate_demos.py (each holds demos/<episode>/)"""
    chunks: pathlib.Path | None = None
    """instead of demos: a .npy of already prepared (N, horizon, action_dim) chunks, used as they are"""
    horizon: int = 10
    stride: int = 1
    """steps between chunk starts within an episode"""
    delta_actions: bool = True
    norm_stats: pathlib.Path | None = None
    """norm_stats.json to normalise with (default: quantile stats computed from the same demos)"""
    scale: float = 10.0
    vocab_size: int = 384
    """BPE vocabulary (>256); 384 leaves the tiny 1024-id model room for its 512 text pieces"""


def main(args: Args) -> None:
    if (args.chunks is None) == (not args.demos):
        raise SystemExit("give exactly one of --demos or --chunks")
    stats = None
    if args.chunks is not None:
        chunks = np.load(args.chunks)
        if chunks.ndim != 3:
            raise SystemExit(f"{args.chunks}: expected (N, horizon, action_dim), got shape {chunks.shape}")
    else:
        chunks, stats = fast_training_chunks(args.demos, args.horizon, args.stride, args.delta_actions, args.norm_stats)
    tokenizer = FASTTokenizer.train(chunks, scale=args.scale, vocab_size=args.vocab_size)
    tokenizer.save(args.out)
    if stats is not None:
        save_norm_stats(args.out / "norm_stats.json", {"actions": stats})
    lengths = [len(tokenizer.encode(c)) for c in chunks]
    errors = [np.abs(tokenizer.decode(tokenizer.encode(c)).actions - c).max() for c in chunks]
    summary = {"out": str(args.out), "chunks": int(len(chunks)), "chunk_shape": list(chunks.shape[1:]),
               "vocab_size": tokenizer.vocab_size, "min_token": tokenizer.min_token, "scale": tokenizer.scale,
               "tokens_per_chunk_mean": float(np.mean(lengths)), "tokens_per_chunk_max": int(np.max(lengths)),
               "round_trip_max_abs_error": float(np.max(errors)),
               "error_bound": tokenizer.error_bound(chunks.shape[1])}
    print(json.dumps(summary))


if __name__ == "__main__":
    main(tyro.cli(Args))
