"""Save / load SAEs in SAELens' on-disk layout (`cfg.json` + `sae_weights.safetensors`), with validation.

Layout written by `save_sae(DIR, sae)`:

* `DIR/sae_weights.safetensors`: float32 `W_enc (d_in, d_sae)`, `b_enc (d_sae,)`, `W_dec (d_sae, d_in)`,
  `b_dec (d_in,)`, and for BatchTopK `threshold (d_sae,)`. The input scale is *folded* into the weights
  (W_enc * s, W_dec / s, b_dec / s; pre-activations and thresholds unchanged) so SAELens and any plain
  reader apply them to raw activations: x_hat = decode(encode(x)) in the units of x.
* `DIR/cfg.json`: SAELens fields `architecture` ("topk" for TopK; "jumprelu" for BatchTopK, which is how
  SAELens itself saves BatchTopK for inference), `d_in`, `d_sae`, `dtype`, `device`,
  `apply_b_dec_to_input` (true), `normalize_activations` ("none": the scale is folded), `reshape_activations`,
  `k` and `rescale_acts_by_decoder_norm` (false) for TopK, and `metadata` with our extras under
  `metadata.vla_interp`: `format_version`, `arch` ("topk" | "batchtopk"), `k`, `threshold` (scalar or null),
  `input_scale` (s, multiply raw inputs by it to get training units), `weights_fold_input_scale` (true),
  plus `training` (config, resolved hyperparameters, fingerprint) and whatever the caller adds
  (e.g. `site`).

`load_sae` checks that cfg.json and the weights agree (names, shapes, finite values, k within the
dictionary) and raises an error naming the file, the key and expected vs found.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as safetensors_bytes

from openpi.interp.sae import model as sae_model
from openpi.shared.io import read_json, write_bytes_atomic, write_json_atomic

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
FORMAT_VERSION = 1


def _folded_weights(sae: sae_model.SparseAutoencoder) -> dict[str, np.ndarray]:
    s = sae.spec.input_scale
    p = {k: np.asarray(v, np.float32) for k, v in sae.params.items()}
    out = {
        "W_enc": p["W_enc"] * np.float32(s),
        "b_enc": p["b_enc"],
        "W_dec": p["W_dec"] / np.float32(s),
        "b_dec": p["b_dec"] / np.float32(s),
    }
    if sae.spec.arch == "batchtopk":
        out["threshold"] = np.asarray(sae.threshold, np.float32)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def sae_cfg_dict(sae: sae_model.SparseAutoencoder, extras: dict | None = None) -> dict:
    """cfg.json content for `sae` (see module docstring)."""
    spec = sae.spec
    thr = None
    if sae.threshold is not None:
        t = np.asarray(sae.threshold)
        thr = float(t[0]) if np.all(t == t[0]) else None
    ours = {
        "format_version": FORMAT_VERSION,
        "arch": spec.arch,
        "k": spec.k,
        "threshold": thr,
        "input_scale": spec.input_scale,
        "weights_fold_input_scale": True,
    }
    ours.update(extras or {})
    cfg = {
        "architecture": "topk" if spec.arch == "topk" else "jumprelu",
        "d_in": spec.d_in,
        "d_sae": spec.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"vla_interp": ours},
    }
    if spec.arch == "topk":
        cfg["k"] = spec.k
        cfg["rescale_acts_by_decoder_norm"] = False
    site = ours.get("site")
    if site:
        cfg["metadata"]["hook_name"] = site
    return cfg


def save_sae(out_dir: str | pathlib.Path, sae: sae_model.SparseAutoencoder, extras: dict | None = None) -> None:
    """Write weights then cfg.json into `out_dir`, each atomically (cfg.json last: its presence marks a complete SAE)."""
    out = pathlib.Path(out_dir)
    write_bytes_atomic(out / WEIGHTS_NAME, safetensors_bytes(_folded_weights(sae)))
    write_json_atomic(out / CFG_NAME, sae_cfg_dict(sae, extras), indent=2)


def _need(cfg: dict, key: str, path: pathlib.Path, kind: type | tuple[type, ...]):
    if key not in cfg:
        raise KeyError(f"{path}: missing field {key!r}")
    val = cfg[key]
    if not isinstance(val, kind) or isinstance(val, bool) and kind is int:
        raise ValueError(f"{path}: field {key!r} must be {kind}, found {val!r}")
    return val


def load_sae(sae_dir: str | pathlib.Path) -> sae_model.SparseAutoencoder:
    """Load and validate an SAE directory written by `save_sae` (or a SAELens topk / jumprelu SAE)."""
    d = pathlib.Path(sae_dir)
    cfg_path, w_path = d / CFG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"SAE directory {d}: missing {p.name}")
    cfg = read_json(cfg_path, "SAE config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    arch_name = _need(cfg, "architecture", cfg_path, str)
    d_in = _need(cfg, "d_in", cfg_path, int)
    d_sae = _need(cfg, "d_sae", cfg_path, int)
    if arch_name not in ("topk", "jumprelu"):
        raise ValueError(f"{cfg_path}: architecture {arch_name!r} is not supported (expected 'topk' or 'jumprelu')")
    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} is not supported; fold the scaling into the weights")
    ours = (cfg.get("metadata") or {}).get("vla_interp") or {}
    scale = float(ours.get("input_scale", 1.0))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{cfg_path}: metadata.vla_interp.input_scale must be positive, found {scale}")

    try:
        w = load_file(str(w_path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{w_path}: cannot read safetensors file ({err})") from err
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch_name == "jumprelu":
        expected["threshold"] = (d_sae,)
    for name, shape in expected.items():
        if name not in w:
            raise KeyError(f"{w_path}: missing tensor {name!r} (cfg.json architecture {arch_name!r}); found {sorted(w)}")
        if tuple(w[name].shape) != shape:
            raise ValueError(
                f"{w_path}: tensor {name} has shape {tuple(w[name].shape)} but {cfg_path.name} "
                f"(d_in={d_in}, d_sae={d_sae}) implies {shape}"
            )
        if not np.all(np.isfinite(w[name])):
            raise ValueError(f"{w_path}: tensor {name} contains NaN or Inf")
    w = {k: np.asarray(v, np.float32) for k, v in w.items()}

    if arch_name == "topk":
        k = _need(cfg, "k", cfg_path, int)
        arch = "topk"
        if cfg.get("rescale_acts_by_decoder_norm", False):
            raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported")
    else:
        k = int(ours.get("k", cfg.get("k", min(d_sae, 32))))
        arch = "batchtopk"
    if not 1 <= k <= d_sae:
        raise ValueError(f"{cfg_path}: k={k} must be between 1 and d_sae={d_sae}")
    if ours:
        for field, val in (("k", k), ("arch", arch)):
            if field in ours and ours[field] != val:
                raise ValueError(f"{cfg_path}: metadata.vla_interp.{field}={ours[field]!r} disagrees with the SAELens fields ({val!r})")
    if not cfg.get("apply_b_dec_to_input", True):
        # pre = x @ W_enc + b_enc  ==  (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    params = {
        "W_enc": w["W_enc"] / np.float32(scale),
        "b_enc": w["b_enc"],
        "W_dec": w["W_dec"] * np.float32(scale),
        "b_dec": w["b_dec"] * np.float32(scale),
    }
    spec = sae_model.SAESpec(d_in=d_in, d_sae=d_sae, arch=arch, k=k, input_scale=scale)
    return sae_model.SparseAutoencoder(spec, params, w.get("threshold"))


def load_cfg(sae_dir: str | pathlib.Path) -> dict:
    """The raw cfg.json of an SAE directory."""
    return read_json(pathlib.Path(sae_dir) / CFG_NAME, "SAE config")
