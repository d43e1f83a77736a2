"""Orbax checkpoints in openpi's released layout: ``<dir>/params`` holds the tree ``{"params": <nested dict>}``.

Loading validates every path and shape against the model config before reading any array, and names the first
mismatch; trailing ``value`` keys (written by nnx training saves) are stripped; arrays are cast on load.
"""
from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from openpi.models.config import AnyModelConfig, Pi0FASTConfig
from openpi.models.param_shapes import param_shapes
from openpi.models.params_util import flatten, unflatten

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not fit the config."""


def params_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Accept a checkpoint root (containing ``params/``) or the ``params`` directory itself."""
    path = pathlib.Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if (path / "params").is_dir():
        return path / "params"
    if path.name == "params" and (path / "_METADATA").exists():
        return path
    raise CheckpointError(f"{path} is not an openpi checkpoint: expected a 'params/' directory (Orbax) inside it")


def _strip_value(flat: dict) -> dict:
    return {(k[: -len("/value")] if k.endswith("/value") else k): v for k, v in flat.items()}


def _metadata_tree(directory: pathlib.Path) -> dict:
    meta = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
        raise CheckpointError(f"{directory}: expected a tree {{'params': ...}}, found top-level keys "
                              f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
    return tree


def _describe(config: AnyModelConfig) -> str:
    if isinstance(config, Pi0FASTConfig):
        return f"{config.model_type}, {config.paligemma_variant}"
    return f"{config.model_type}, {config.paligemma_variant}/{config.action_expert_variant}"


def validate_shapes(found: dict[str, tuple], config: AnyModelConfig, source: str) -> None:
    """Compare flat path -> shape with the config; raise naming the first mismatch."""
    expected = param_shapes(config)
    for path in sorted(set(expected) | set(found)):
        if path not in found:
            raise CheckpointError(f"{source}: parameter {path!r} expected by config ({_describe(config)}) "
                                  "is missing")
        if path not in expected:
            raise CheckpointError(f"{source}: unexpected parameter {path!r} (shape {found[path]}) not in the "
                                  f"{config.model_type} config; wrong config for this checkpoint?")
        if tuple(found[path]) != tuple(expected[path]):
            raise CheckpointError(f"{source}: parameter {path!r} has shape {tuple(found[path])}, config expects "
                                  f"{tuple(expected[path])}")


def load_params(path: str | pathlib.Path, config: AnyModelConfig, dtype=None) -> dict:
    """Restore parameters as numpy arrays (cast to ``dtype`` if given, else the stored dtype)."""
    directory = params_dir(path)
    tree = _metadata_tree(directory)
    flat_meta = flatten(tree["params"])
    stripped = _strip_value(flat_meta)
    validate_shapes({k: tuple(v.shape) for k, v in stripped.items()}, config, str(directory))
    restore_args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=None if dtype is None else np.dtype(dtype)), tree)
    restored = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(item=None,
                                                                                     restore_args=restore_args))
    flat = _strip_value(flatten(restored["params"]))
    logger.info("loaded %d parameter arrays from %s", len(flat), directory)
    return unflatten(flat)


def save_params(path: str | pathlib.Path, params: dict) -> pathlib.Path:
    """Write ``<path>/params`` in the released layout (refuses to overwrite an existing one)."""
    root = pathlib.Path(path).expanduser().resolve()
    target = root / "params"
    if target.exists():
        raise CheckpointError(f"{target} already exists; refusing to overwrite a checkpoint")
    root.mkdir(parents=True, exist_ok=True)
    tree = {"params": jax.tree.map(np.asarray, params)}
    ocp.PyTreeCheckpointer().save(target, tree)
    return root
