"""Models (Pi0 / Pi0.5 / Pi0-FAST, and LeRobot's Diffusion Policy) as pure JAX functions over their released
parameter trees, with their named hook points.

``hook_points(config)`` / ``hook_names(config)`` list every hook point of a model config (names and axes): the
table that recording, interventions, the activation store and HOOKS.md all read.
"""
from __future__ import annotations

from typing import Any

from openpi.models.hooks import HookPoint, HookTable


def _family(config: Any):
    from openpi.models import pi0, pi0_fast
    from openpi.models.config import Pi0Config, Pi0FASTConfig
    from openpi.models.diffusion import model as diffusion
    from openpi.models.diffusion.config import DiffusionConfig

    families = {Pi0Config: pi0, Pi0FASTConfig: pi0_fast, DiffusionConfig: diffusion}
    for kind, module in families.items():
        if isinstance(config, kind):
            return module
    raise TypeError(f"no hook table for config type {type(config).__name__}; known: "
                    f"{[k.__name__ for k in families]}")


def hook_points(config: Any) -> list[HookPoint]:
    """Every hook point of a model config (see HookPoint)."""
    return _family(config).hook_points(config)


def hook_table(config: Any) -> HookTable:
    """Hook points plus the token spans that ``tokens=`` selectors name."""
    return _family(config).hook_table(config)


def hook_names(config: Any) -> dict[str, tuple[str, ...]]:
    """``{name: axes}`` of every hook point, axes as a recording returns them (``step`` first for points called
    at every denoising step), e.g. ``{"llm.expert1.layer.0.resid_post": ("step", "batch", "token", "d_model")}``."""
    return {p.name: p.recorded_axes for p in hook_points(config)}


__all__ = ["HookPoint", "HookTable", "hook_names", "hook_points", "hook_table"]
