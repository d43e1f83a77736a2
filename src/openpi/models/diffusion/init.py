"""Random initial parameters of a Diffusion Policy, as PyTorch's default initialisers would draw them in kind.

Why not LeRobot's exact draws: a trained policy only needs a sane starting scale. Every conv / linear weight and
bias is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default for ``nn.Conv*`` and ``nn.Linear``, fan_in =
shape[1] * prod(kernel)), norm layers start at weight 1 / bias 0, BatchNorm statistics at 0 / 1 and the spatial
softmax's position grid is the fixed buffer LeRobot builds.
"""
from __future__ import annotations

import numpy as np

from openpi.models.diffusion import checkpoint
from openpi.models.diffusion.config import DiffusionConfig
from openpi.models.diffusion.spatial_softmax import pos_grid

# Leaves that are buffers, not parameters: never trained (their gradient is zeroed and their value kept).
BUFFER_SUFFIXES = ("pos_grid", "running_mean", "running_var", "num_batches_tracked")


def is_buffer(key: str) -> bool:
    return key.rpartition(".")[2] in BUFFER_SUFFIXES


def init_state_dict(config: DiffusionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A LeRobot state_dict (flat keys -> float32 / int64 arrays) for ``config`` with fresh random weights."""
    rng = np.random.default_rng(seed)
    shapes = checkpoint.param_shapes(config)
    out: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        owner, _, leaf = key.rpartition(".")
        sibling = shapes.get(f"{owner}.weight")
        if leaf == "pos_grid":
            out[key] = pos_grid(*config.feature_map_hw).astype(np.float32)
        elif leaf == "num_batches_tracked":
            out[key] = np.zeros(shape, np.int64)
        elif leaf in ("running_mean", "running_var"):
            out[key] = np.full(shape, 0.0 if leaf == "running_mean" else 1.0, np.float32)
        elif sibling is not None and len(sibling) == 1:  # a norm layer (1-D weight): identity at the start
            out[key] = np.full(shape, 1.0 if leaf == "weight" else 0.0, np.float32)
        else:
            fan_in = int(np.prod(sibling[1:]))
            bound = 1.0 / np.sqrt(max(fan_in, 1))
            out[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return out


def init_params(config: DiffusionConfig, seed: int = 0) -> dict:
    """The nested parameter tree the model functions take (as ``checkpoint.params_from_state_dict`` builds)."""
    return checkpoint.params_from_state_dict(init_state_dict(config, seed), config, f"random init (seed {seed})")
