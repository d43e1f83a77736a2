"""Load a LeRobot Diffusion Policy folder (``config.json`` + ``model.safetensors`` + processor files) unchanged.

The parameter tree is LeRobot's state_dict split on '.', so ``flat_params(tree)`` gives back the exact state_dict
keys (``diffusion.rgb_encoder.backbone.0.weight``, ...). Every key and shape is checked against what the config
implies before anything is used; errors name the file, the key, the expected and the found shape.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from openpi.models.diffusion import encoder, unet
from openpi.models.diffusion.config import ACTION, DiffusionConfig, from_dict, load_config
from openpi.models.diffusion.normalize import Normalizer, load_normalizer
from openpi.models.diffusion.spatial_softmax import pos_grid
from openpi.models.params_util import flatten, unflatten

WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A policy folder whose weights are missing, misnamed or do not fit its config."""


def param_shapes(config: DiffusionConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict key LeRobot's ``DiffusionPolicy`` has for this config, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    if config.image_keys:
        if config.use_separate_rgb_encoder_per_camera:
            for i in range(config.num_cameras):
                shapes.update(encoder.param_shapes(config, f"diffusion.rgb_encoder.{i}"))
        else:
            shapes.update(encoder.param_shapes(config, "diffusion.rgb_encoder"))
    shapes.update(unet.param_shapes(config))
    return shapes


def validate_state_dict(found: Mapping[str, tuple[int, ...]], config: DiffusionConfig, source: str) -> None:
    """Raise naming the first missing, unexpected or mis-shaped key (missing ones first: the likelier mistake)."""
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = ""
        if any(k.startswith("normalize_") for k in found):
            hint = ("; this looks like a pre-0.4 LeRobot checkpoint with normalisation buffers in the weights: "
                    "migrate it with LeRobot's migrate_policy_normalization first")
        raise CheckpointError(f"{source}: weight {missing[0]!r} (shape {expected[missing[0]]}) expected by the "
                              f"config is missing{more}{hint}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected weight {unexpected[0]!r} (shape {tuple(found[unexpected[0]])}) "
                              "that the config does not use; wrong config.json for these weights?")
    for key in sorted(expected):
        if tuple(found[key]) != tuple(expected[key]):
            raise CheckpointError(f"{source}: weight {key!r} has shape {tuple(found[key])}, the config expects "
                                  f"{tuple(expected[key])}")


def params_from_state_dict(flat: Mapping[str, np.ndarray], config: DiffusionConfig,
                           source: str = "<state_dict>") -> dict:
    """Validate a flat state_dict and nest it on '.' (float arrays float32, integer buffers int32)."""
    validate_state_dict({k: tuple(np.shape(v)) for k, v in flat.items()}, config, source)
    grid = pos_grid(*config.feature_map_hw)
    for key, value in flat.items():
        if key.endswith("pool.pos_grid") and not np.allclose(np.asarray(value), grid, atol=1e-6):
            raise CheckpointError(f"{source}: buffer {key!r} differs from the [x, y] linspace grid of a "
                                  f"{config.feature_map_hw} feature map that LeRobot builds")
    arrays = {k.replace(".", "/"): jnp.asarray(np.asarray(v).astype(
        np.float32 if np.issubdtype(np.asarray(v).dtype, np.floating) else np.int32)) for k, v in flat.items()}
    return unflatten(arrays)


def flat_params(params: Mapping) -> dict:
    """The inverse of :func:`params_from_state_dict`: LeRobot state_dict keys -> arrays."""
    return {k.replace("/", "."): v for k, v in flatten(params).items()}


def load_policy(folder: str | pathlib.Path) -> tuple[DiffusionConfig, dict, Normalizer]:
    """(config, params, normalizer) from a LeRobot ``save_pretrained`` folder."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: LeRobot policy folder not found")
    config = load_config(folder / "config.json")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    params = params_from_state_dict(load_file(str(weights)), config, str(weights))
    return config, params, load_normalizer(folder, config)


def save_policy(folder: str | pathlib.Path, raw_config: Mapping, params: Mapping,
                stats: Mapping[str, Mapping[str, np.ndarray]], eps: float = 1e-8) -> pathlib.Path:
    """Write a policy folder in LeRobot's ``save_pretrained`` layout that :func:`load_policy` reads back:
    ``config.json`` (``raw_config``), ``model.safetensors`` (float32 state_dict) and the pre/postprocessor
    pipelines with their statistics (``stats``: feature -> {mean, std, min, max, ...})."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = from_dict(raw_config, str(folder / "config.json"))  # refuse to write what could not be read back
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat_params(params).items()}
    validate_state_dict({k: v.shape for k, v in flat.items()}, config, "params to save")
    save_file(flat, str(folder / WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps({"type": "diffusion", **dict(raw_config)}, indent=2))
    features = {name: {"type": f.type, "shape": list(f.shape)} for name, f in (*config.input_features,
                                                                                  *config.output_features)}
    norm_map = dict(config.normalization_mapping)

    def pipeline(name: str, registry: str, feats: dict, index: int) -> None:
        state_file = f"{name}_step_{index}_{registry}.safetensors"
        tensors = {f"{feat}.{stat}": np.ascontiguousarray(np.asarray(v, np.float32))
                   for feat in feats for stat, v in stats[feat].items()}
        save_file(tensors, str(folder / state_file))
        step = {"registry_name": registry, "config": {"eps": eps, "features": feats, "norm_map": norm_map},
                "state_file": state_file}
        (folder / f"{name}.json").write_text(json.dumps({"name": name, "steps": [step]}, indent=2))

    pipeline("policy_preprocessor", "normalizer_processor", features, 0)
    pipeline("policy_postprocessor", "unnormalizer_processor", {ACTION: features[ACTION]}, 0)
    return folder
