"""Helpers shared by model tests: load the openpi reference fixture as our inputs."""
from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from openpi.models.config import tiny_config
from openpi.models.model import make_observation
from openpi.models.params_util import unflatten

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "openpi_ref" / "pi0_tiny.npz"


def load_fixture():
    z = np.load(FIXTURE)
    params = unflatten({k: jnp.asarray(z[k]) for k in z.files if not k.startswith(("input/", "output/"))})
    cfg = tiny_config()
    cams = cfg.image_keys
    obs = make_observation({k: z[f"input/image_uint8/{k}"] for k in cams}, {k: z[f"input/image_mask/{k}"] for k in cams},
                           z["input/state"], z["input/tokenized_prompt"], z["input/tokenized_prompt_mask"])
    return cfg, params, obs, z
