"""LeRobot's normaliser / unnormaliser processor steps, read from a saved policy folder.

LeRobot keeps normalisation outside the model: ``policy_preprocessor.json`` names a ``normalizer_processor`` step
(eps, norm_map, features) whose statistics are in a safetensors file with keys ``<feature>.<stat>``;
``policy_postprocessor.json`` names the ``unnormalizer_processor`` for the action. Formulas (per feature type):

- MEAN_STD: (x - mean) / (std + eps); inverse x * std + mean.
- MIN_MAX: 2 (x - min) / d - 1 with d = max - min (d = eps where it is 0); inverse (x + 1) / 2 * d + min.
- QUANTILES / QUANTILE10: as MIN_MAX with (q01, q99) / (q10, q90).
- IDENTITY: unchanged.

Unlike LeRobot, a feature whose mode needs statistics that the file lacks is an error, not a silent pass-through.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from openpi.models.diffusion.config import NORM_MODES, ConfigError, DiffusionConfig

STATS_FOR_MODE = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"),
                  "QUANTILE10": ("q10", "q90"), "IDENTITY": ()}


@dataclasses.dataclass(frozen=True)
class FeatureNorm:
    mode: str
    stats: Mapping[str, np.ndarray]
    eps: float

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = (self.stats[k] for k in STATS_FOR_MODE[self.mode])
        d = hi - lo
        return lo, jnp.where(d == 0, jnp.float32(self.eps), d).astype(jnp.float32)  # jnp: stats may be traced

    def normalize(self, x):
        if self.mode == "IDENTITY":
            return x
        if self.mode == "MEAN_STD":
            return (x - self.stats["mean"]) / (self.stats["std"] + np.float32(self.eps))
        lo, d = self._range()
        return 2 * (x - lo) / d - 1

    def unnormalize(self, x):
        if self.mode == "IDENTITY":
            return x
        if self.mode == "MEAN_STD":
            return x * self.stats["std"] + self.stats["mean"]
        lo, d = self._range()
        return (x + 1) / 2 * d + lo


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """(Un)normalisation of one policy: ``pre`` from the preprocessor (observations and the training action),
    ``post`` from the postprocessor (the action the policy emits)."""

    pre: Mapping[str, FeatureNorm]
    post: Mapping[str, FeatureNorm]

    def normalize(self, key: str, x):
        if key not in self.pre:
            raise KeyError(f"the preprocessor does not normalise {key!r}; it knows {sorted(self.pre)}")
        return self.pre[key].normalize(jnp.asarray(x, jnp.float32))

    def unnormalize(self, key: str, x):
        if key not in self.post:
            raise KeyError(f"the postprocessor does not unnormalise {key!r}; it knows {sorted(self.post)}")
        return self.post[key].unnormalize(jnp.asarray(x, jnp.float32))


def _find_step(pipeline_file: pathlib.Path, registry_name: str) -> dict:
    if not pipeline_file.is_file():
        raise ConfigError(f"{pipeline_file}: processor pipeline not found (a LeRobot >= 0.4 policy folder holds it)")
    steps = json.loads(pipeline_file.read_text()).get("steps", [])
    hits = [s for s in steps if s.get("registry_name") == registry_name]
    if len(hits) != 1:
        raise ConfigError(f"{pipeline_file}: expected exactly one {registry_name!r} step, found "
                          f"{[s.get('registry_name') for s in steps]}")
    return hits[0]


def _feature_norms(folder: pathlib.Path, pipeline: str, registry_name: str,
                   config: DiffusionConfig) -> dict[str, FeatureNorm]:
    """FeatureNorm for each feature the processor step lists (name -> type in its config)."""
    step = _find_step(folder / pipeline, registry_name)
    cfg = step.get("config", {})
    try:
        features = {str(k): str(v["type"]) for k, v in cfg["features"].items()}
    except (KeyError, TypeError, AttributeError):
        raise ConfigError(f"{folder / pipeline}: step {registry_name!r} has no valid 'features' mapping") from None
    norm_map = {str(k): str(v) for k, v in cfg.get("norm_map", {}).items()}
    for ftype, mode in norm_map.items():
        if mode not in NORM_MODES:
            raise ConfigError(f"{folder / pipeline}: norm_map[{ftype!r}]={mode!r}; expected one of {NORM_MODES}")
        if mode != config.norm_mode(ftype):
            raise ConfigError(f"{folder / pipeline}: norm_map[{ftype!r}]={mode!r} disagrees with the policy "
                              f"config's normalization_mapping ({config.norm_mode(ftype)!r})")
    eps = float(cfg.get("eps", 1e-8))
    state_file = step.get("state_file")
    stats: dict[str, np.ndarray] = {}
    if state_file is not None:
        path = folder / state_file
        if not path.is_file():
            raise ConfigError(f"{folder / pipeline}: statistics file {state_file!r} not found in {folder}")
        stats = {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    out = {}
    for name, ftype in features.items():
        mode = norm_map.get(ftype, "IDENTITY")
        need = STATS_FOR_MODE[mode]
        missing = [f"{name}.{s}" for s in need if f"{name}.{s}" not in stats]
        if missing:
            raise ConfigError(f"{folder / (state_file or pipeline)}: {mode} normalisation of {name!r} needs "
                              f"{missing}, which the statistics file lacks")
        own = {k.rpartition(".")[2]: v for k, v in stats.items() if k.rpartition(".")[0] == name}
        out[name] = FeatureNorm(mode, own, eps)  # every stat of the feature (mean, std, min, max, ...)
    return out


def load_normalizer(folder: str | pathlib.Path, config: DiffusionConfig) -> Normalizer:
    """Read the normaliser of ``policy_preprocessor.json`` and the unnormaliser of ``policy_postprocessor.json``."""
    folder = pathlib.Path(folder)
    pre = _feature_norms(folder, "policy_preprocessor.json", "normalizer_processor", config)
    post = _feature_norms(folder, "policy_postprocessor.json", "unnormalizer_processor", config)
    missing = [k for k, _ in config.input_features if k not in pre]
    if missing:
        raise ConfigError(f"{folder / 'policy_preprocessor.json'}: the normaliser does not list input feature(s) "
                          f"{missing} of the policy config")
    if "action" not in post:
        raise ConfigError(f"{folder / 'policy_postprocessor.json'}: the unnormaliser does not list 'action'")
    return Normalizer(pre=pre, post=post)
