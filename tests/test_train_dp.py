"""Diffusion Policy training on synthetic demos (the dp_micro preset): resume is bit-exact, buffers stay fixed,
the loss falls on a fixed batch, and every checkpoint is a LeRobot-layout folder that serves through
create_policy; the random init and the folder writer round-trip."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from openpi.models.diffusion import checkpoint as dp_ckpt
from openpi.models.diffusion.init import init_state_dict
from openpi.policies.policy_config import create_policy
from openpi.shared.rundir import RunSettingsError
from openpi.training import train, train_dp
from openpi.training.demos import write_synthetic_demos
from train_runs import STEPS, short_config, stopped_resumed_and_straight


def _cfg(demo_root, out_dir, **kw) -> train.TrainConfig:
    return short_config(demo_root, out_dir, **{"policy_config": "dp_micro", "batch_size": 4, "peak_lr": 3e-3, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return stopped_resumed_and_straight(tmp_path_factory.mktemp("train_dp"), _cfg)


def _weights(run_dir, step):
    return load_file(str(train.checkpoints(run_dir).step_dir(step) / dp_ckpt.WEIGHTS_FILE))


def test_resume_is_bit_exact_and_buffers_stay_fixed(runs):
    a, b = runs["a"], runs["b"]
    assert runs["first"]["step"] == 2 and runs["resumed"]["step"] == STEPS
    end_a, end_b, mid = _weights(a, STEPS), _weights(b, STEPS), _weights(a, 2)
    assert set(end_a) == set(end_b)
    for key in end_a:
        np.testing.assert_array_equal(end_a[key], end_b[key], err_msg=key)
    moved = [k for k in end_a if not np.array_equal(end_a[k], mid[k])]
    grids = [k for k in end_a if k.endswith("pool.pos_grid")]
    assert moved and grids and not set(grids) & set(moved)  # weights trained, the position grids did not
    _, config = train_dp.preset("dp_micro")
    for key in grids:
        np.testing.assert_allclose(end_a[key], init_state_dict(config)[key])


def test_checkpoint_serves_through_create_policy(runs, tmp_path):
    step_dir = train.checkpoints(runs["a"]).step_dir(STEPS)
    packaged = train_dp.package_checkpoint(step_dir, tmp_path / "dp")
    assert not (packaged / "state.npz").exists() and (packaged / "train_meta.json").is_file()
    policy = create_policy("dp_lerobot", str(packaged))
    obs = {"observation/image": np.full((224, 224, 3), 90, np.uint8),
           "observation/wrist_image": np.full((224, 224, 3), 30, np.uint8),
           "observation/state": np.linspace(-0.2, 0.2, 8).astype(np.float32)}
    out = policy.infer(obs)
    _, config = train_dp.preset("dp_micro")
    assert out["actions"].shape == (config.n_action_steps, 7) and np.isfinite(out["actions"]).all()
    # the unnormaliser maps [-1, 1] to the demos' action range: served actions stay inside it (plus clipping)
    demos_actions = train_dp.DPFrames(train.DemoDataset([runs["demos"]], config.horizon), config, False).all_actions
    assert (out["actions"] >= demos_actions.min(0) - 1e-4).all() and (out["actions"] <= demos_actions.max(0) + 1e-4).all()


def test_loss_falls_on_a_fixed_batch(tmp_path):
    demo_root = write_synthetic_demos(tmp_path / "demos", episodes=2, steps=10)
    raw, config = train_dp.preset("dp_micro")
    frames = train_dp.DPFrames(train.DemoDataset([demo_root], config.horizon), config, False)
    optimizer, _ = train.make_optimizer(_cfg(demo_root, tmp_path / "run"))  # the runs' (compiled step reused)
    params = dp_ckpt.params_from_state_dict(init_state_dict(config, 0), config)
    step = train_dp.make_train_step(config, optimizer)
    stats, mask = jax.tree.map(jax.numpy.asarray, frames.stats()), train_dp.trainable_mask(params)
    opt_state, batch, losses = optimizer.init(params), frames.batch(np.arange(4)), []
    for i in range(40):  # past the schedule's 4 steps the learning rate stays at end_lr
        params, opt_state, info = step(params, opt_state, batch, jax.random.key(i % 4), stats, mask)
        losses.append(float(info["loss"]))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])  # measured: 1.07 -> 0.67


def test_folder_writer_round_trips(tmp_path):
    raw, config = train_dp.preset("dp_micro")
    state = init_state_dict(config, seed=3)
    stats = {k: {"mean": np.zeros(s), "std": np.ones(s), "min": -np.ones(s), "max": np.ones(s)}
             for k, s in (("observation.images.image", (3, 1, 1)), ("observation.images.wrist_image", (3, 1, 1)),
                          ("observation.state", (8,)), ("action", (7,)))}
    params = dp_ckpt.params_from_state_dict(state, config)
    folder = dp_ckpt.save_policy(tmp_path / "p", raw, params, stats)
    loaded_config, loaded, normalizer = dp_ckpt.load_policy(folder)
    assert loaded_config.backbone_width == 16 and loaded_config.crop_shape == (28, 28)
    flat = dp_ckpt.flat_params(loaded)
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value.astype(flat[key].dtype), err_msg=key)
    np.testing.assert_allclose(normalizer.unnormalize("action", np.zeros(7)), np.zeros(7), atol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        dp_ckpt.save_policy(tmp_path / "q", raw, {"diffusion": {}}, stats)


def test_pi0_only_options_and_changed_settings_are_refused(runs, tmp_path):
    with pytest.raises(ValueError, match="--augment"):
        train.train(_cfg(runs["demos"], tmp_path / "x", augment=True), progress=False)
    with pytest.raises(RunSettingsError, match="peak_lr"):
        train.train(_cfg(runs["demos"], runs["b"], peak_lr=1e-2), progress=False)
    with pytest.raises(ValueError, match="unknown Diffusion Policy preset"):
        train_dp.preset("dp_nope")
