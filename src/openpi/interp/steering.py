"""Steer a policy with an SAE feature: clamp, ablate or scale one latent at its site during closed-loop rollouts.

The edit changes only the chosen feature's contribution and keeps the SAE's reconstruction error, so a zero edit
is the identity: ``x' = x + (target - a_f(x)) * W_dec[f] / input_scale`` where ``a_f`` is the feature's inference
code (TopK or BatchTopK/JumpReLU), and ``target`` is 0 (ablate), ``value`` (clamp) or ``value * a_f`` (scale).
It plugs into the model as an ``Intervention(op="replace")`` at the SAE's site, so it is pure and jit-compiled.
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models.hooks import Intervention
from openpi.interp.sae.io import load_sae
from openpi.interp.sae.model import jumprelu_codes, pre_activations

MODES = ("ablate", "clamp", "scale")


def feature_edit_fn(sae_dir: str | pathlib.Path, feature: int, mode: str, value: float = 0.0
                    ) -> Callable[[jax.Array], jax.Array]:
    """A pure function (..., d_in) -> (..., d_in) editing one SAE feature of raw activations."""
    if mode not in MODES:
        raise ValueError(f"unknown steering mode {mode!r}; expected one of {MODES}")
    sae = load_sae(sae_dir)
    spec = sae.spec
    if not 0 <= feature < spec.d_sae:
        raise ValueError(f"feature {feature} out of range for {sae_dir} (d_sae = {spec.d_sae})")
    params = {k: jnp.asarray(v) for k, v in sae.params.items()}
    threshold = None if sae.threshold is None else jnp.asarray(sae.threshold)
    direction = params["W_dec"][feature] / spec.input_scale

    def code(x2d: jax.Array) -> jax.Array:
        pre = pre_activations(params, x2d * spec.input_scale)
        if spec.arch == "topk":
            kth = jax.lax.top_k(pre, spec.k)[0][:, -1]
            return jnp.where(pre[:, feature] >= kth, jax.nn.relu(pre[:, feature]), 0.0)
        return jumprelu_codes(pre, threshold)[:, feature]

    def edit(x: jax.Array) -> jax.Array:
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        a = code(flat)
        target = {"ablate": jnp.zeros_like(a), "clamp": jnp.full_like(a, value), "scale": value * a}[mode]
        return (flat + (target - a)[:, None] * direction).reshape(x.shape).astype(x.dtype)

    edit.__name__ = f"sae_{mode}_f{feature}"
    return edit


@dataclasses.dataclass(frozen=True)
class SteeringSpec:
    sae_dir: str
    site: str
    feature: int
    mode: str = "ablate"
    value: float = 0.0
    tokens: str = "actions"
    steps: str = "all"

    def intervention(self) -> Intervention:
        return Intervention(self.site, "replace", tokens=self.tokens, steps=self.steps,
                            fn=feature_edit_fn(self.sae_dir, self.feature, self.mode, self.value))


def action_change(baseline: dict, steered: dict) -> dict:
    """Per-dimension mean |delta| of the first action chunk (same initial state, seed and noise, so the only
    difference is the edit) and of the executed actions over the common length of the two episodes."""
    first_b = np.asarray(baseline["chunks"][0]["actions"], np.float64)
    first_s = np.asarray(steered["chunks"][0]["actions"], np.float64)
    n = min(len(baseline["actions"]), len(steered["actions"]))
    exec_b = np.asarray(baseline["actions"][:n], np.float64)
    exec_s = np.asarray(steered["actions"][:n], np.float64)
    return {"first_chunk_mean_abs_delta": np.abs(first_s - first_b).mean(axis=0).tolist(),
            "executed_mean_abs_delta": np.abs(exec_s - exec_b).mean(axis=0).tolist() if n else None,
            "common_steps": n}
