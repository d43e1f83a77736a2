"""The pi0_tiny_spatial family at other image grids: what the resolution option builds and serves."""
from __future__ import annotations

import numpy as np
import pytest

from openpi.models.config import IMAGE_KEYS, tiny_config
from openpi.policies import policy_config as pc


def test_the_default_config_is_unchanged_and_the_family_has_the_grids_it_names():
    assert pc.get_config("pi0_tiny_spatial").model == tiny_config(max_token_len=32, image_size=96,
                                                                 siglip_variant="mu/12")
    expect = {"pi0_tiny_spatial": (8, 3, 235), "pi0_tiny_spatial_96p12_2cam": (8, 2, 171),
              "pi0_tiny_spatial10": (8, 2, 171),
              "pi0_tiny_spatial_96p8_2cam": (12, 2, 331), "pi0_tiny_spatial_128p8_2cam": (16, 2, 555)}
    for name, (grid, cams, tokens) in expect.items():
        m = pc.get_config(name).model
        assert (m.grid, len(m.image_keys), m.prefix_len + m.suffix_len) == (grid, cams, tokens), name
        assert m.image_keys == IMAGE_KEYS[:cams]
    with pytest.raises(ValueError, match="cameras"):
        pc.tiny_spatial_config(96, 8, cameras=1)


def test_dropping_the_masked_right_wrist_slot_changes_no_action():
    """The embedded checkpoint served by the two-camera config acts exactly as by its own: the dropped slot's
    tokens were masked out of attention, so the slot only cost compute."""
    three = pc.create_policy("pi0_tiny_spatial")
    two = pc.create_policy("pi0_tiny_spatial_96p12_2cam", str(pc.SPATIAL4_CHECKPOINT))
    rng = np.random.default_rng(0)
    obs = {"observation/image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
           "observation/state": rng.normal(size=8).astype(np.float32),
           "prompt": "pick up the black bowl on the ramekin and place it on the plate"}
    inputs = two.transforms.inputs(obs)
    assert list(inputs["images"]) == list(IMAGE_KEYS[:2]) and all(inputs["image_masks"].values())
    noise = rng.normal(size=(10, 32)).astype(np.float32)
    a, b = three.infer(obs, noise=noise)["actions"], two.infer(obs, noise=noise)["actions"]
    assert np.abs(a).max() > 0.1
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_ten_task_checkpoint_ships_with_its_card():
    """pi0_tiny_spatial10 loads its embedded weights (trained, card summary in the metadata) and acts."""
    policy = pc.create_policy("pi0_tiny_spatial10")
    assert policy.metadata["trained"] and "34 of 100" in policy.metadata["card"]
    rng = np.random.default_rng(1)
    obs = {"observation/image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
           "observation/state": rng.normal(size=8).astype(np.float32),
           "prompt": "pick up the black bowl on the stove and place it on the plate"}
    actions = policy.infer(obs)["actions"]
    assert actions.shape == (10, 7) and np.isfinite(actions).all() and np.abs(actions).max() > 0.1
