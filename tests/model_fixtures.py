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


FAST_FIXTURE = FIXTURE.with_name("pi0_fast_tiny.npz")
FAST_MASK_KEYS = ("tokenized_prompt", "tokenized_prompt_mask", "token_ar_mask", "token_loss_mask")


def load_fast_fixture():
    """(config, params, train observation, infer observation, npz) of the tiny Pi0-FAST fixture."""
    from openpi.models.config import tiny_fast_config
    from openpi.models.model import make_fast_observation

    z = np.load(FAST_FIXTURE)
    params = unflatten({k: jnp.asarray(z[k]) for k in z.files if not k.startswith(("input/", "output/"))})
    cfg = tiny_fast_config()
    images = {k: z[f"input/image_uint8/{k}"] for k in cfg.image_keys}
    masks = {k: z[f"input/image_mask/{k}"] for k in cfg.image_keys}
    train = make_fast_observation(images, masks, *(z[f"input/{k}"] for k in FAST_MASK_KEYS))
    infer = make_fast_observation(images, masks, *(z[f"input/infer/{k}"] for k in FAST_MASK_KEYS))
    return cfg, params, train, infer, z
