"""Diffusion Policy against LeRobot's own outputs (shared/fixtures/lerobot_ref/), its loading errors and hooks."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import LEROBOT_FIXTURES, LEROBOT_POLICY, REPO_ROOT, require_lerobot_policy
from openpi.models.diffusion import checkpoint, config as dp_config, model as dp, parity
from openpi.models.diffusion.policy import DiffusionPolicyModel
from openpi.models.hooks import Intervention, Record

FIXTURES, POLICY = LEROBOT_FIXTURES, LEROBOT_POLICY


@pytest.fixture(scope="module")
def fx():
    require_lerobot_policy()
    model = DiffusionPolicyModel.load(POLICY)
    z = dict(np.load(FIXTURES / "diffusion_tiny_io.npz"))
    raw = {"observation.image": z["obs_image_uint8"], "observation.wrist_image": z["obs_wrist_image_uint8"],
           "observation.state": z["obs_state_raw"]}
    step_noise = np.concatenate([z["ddpm_step_noise"], np.zeros_like(z["ddpm_step_noise"][:1])])
    return model, model.prepare(raw), z, step_noise


def test_parity_cli_passes_on_lerobot_fixture():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "openpi.models.diffusion.parity", str(FIXTURES)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and report["failures"] == []
    with np.load(FIXTURES / "diffusion_tiny_io.npz") as z:
        compared = set(z.files) - set(report["inputs"])
    assert set(report["max_abs_diff"]) == compared  # every non-input array was compared
    assert all(isinstance(d, float) and d <= report["tolerance"] for d in report["max_abs_diff"].values())
    for key in ("enc_keypoints", "global_cond", "unet_output", "loss_train", "ddpm_sample_full", "ddim_actions_unnorm",
                "select_action_ddpm_actions_unnorm"):
        assert key in report["max_abs_diff"]


def test_compare_fails_on_missing_misshaped_and_off_values():
    ref = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32), "c": np.zeros(2, np.float32),
           "t": np.arange(3), "n": np.zeros(2, np.float32), "x": np.ones(1)}
    ours = {"a": np.full(3, 5e-5), "b": np.zeros(3), "c": np.full(2, 1e-3), "t": np.array([0, 1, 3]),
            "n": np.array([np.nan, 0.0])}
    report = parity.compare(ours, ref, inputs={"x"}, tolerance=1e-4)
    assert sorted(report["failures"]) == ["b", "c", "n", "t"] and "x" not in report["max_abs_diff"]
    assert report["max_abs_diff"]["a"] == pytest.approx(5e-5) and not report["ok"]
    ours.pop("a")
    report = parity.compare(ours, ref, inputs={"x"}, tolerance=1e-4)
    assert report["max_abs_diff"]["a"] == "not computed" and "a" in report["failures"]


def test_missing_renamed_or_misshaped_weight_names_the_key(fx):
    model = fx[0]
    flat = load_file(str(POLICY / "model.safetensors"))
    key = "diffusion.unet.mid_modules.1.conv2.block.1.weight"
    missing = {k: v for k, v in flat.items() if k != key}
    with pytest.raises(checkpoint.CheckpointError, match=r"mid_modules\.1\.conv2\.block\.1\.weight.*missing"):
        checkpoint.params_from_state_dict(missing, model.config, "model.safetensors")
    renamed = dict(missing, **{"diffusion.unet.mid_modules.1.conv2.block.1.scale": flat[key]})
    with pytest.raises(checkpoint.CheckpointError, match=r"conv2\.block\.1\.weight"):
        checkpoint.params_from_state_dict(renamed, model.config, "model.safetensors")
    extra = dict(flat, **{"diffusion.unet.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected weight 'diffusion\.unet\.extra\.weight'"):
        checkpoint.params_from_state_dict(extra, model.config, "model.safetensors")
    bad = dict(flat, **{"diffusion.rgb_encoder.out.weight": np.zeros((64, 63), np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match=r"rgb_encoder\.out\.weight.*\(64, 63\).*\(64, 64\)"):
        checkpoint.params_from_state_dict(bad, model.config, "model.safetensors")


def _folder_with_config(tmp_path: pathlib.Path, **changes) -> pathlib.Path:
    """A policy folder whose config.json has ``changes`` (None deletes nothing: it is written as null)."""
    folder = tmp_path / "policy"
    folder.mkdir()
    raw = json.loads((POLICY / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    for f in POLICY.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    return folder


@pytest.mark.parametrize("changes, pattern", [
    ({"resize_shape": [96, 96]}, r"resize_shape"),
    ({"vision_backbone": "resnet50"}, r"vision_backbone='resnet50'"),
    ({"noise_scheduler_type": "PNDM"}, r"noise_scheduler_type='PNDM'"),
    ({"prediction_type": "v_prediction"}, r"prediction_type='v_prediction'"),
    ({"some_new_option": 3}, r"unknown config option\(s\) \['some_new_option'\]"),
    ({"horizon": 18}, r"horizon=18"),
])
def test_unsupported_config_option_names_the_key(tmp_path, changes, pattern):
    folder = _folder_with_config(tmp_path, **changes)
    with pytest.raises(dp_config.ConfigError, match=pattern) as info:
        checkpoint.load_policy(folder)
    assert str(folder / "config.json") in str(info.value)


def test_config_change_that_breaks_shapes_is_a_weight_error(tmp_path):
    folder = _folder_with_config(tmp_path, spatial_softmax_num_keypoints=16)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"'diffusion\.rgb_encoder\.out\.bias' has shape \(64,\), the config expects \(32,\)"):
        checkpoint.load_policy(folder)


def test_separate_encoders_per_camera(fx):
    """The per-camera encoder layout (LeRobot's default) with both encoders = the shared one reproduces the
    shared-encoder conditioning, and its keys are ``rgb_encoder.<i>.*``."""
    model, obs, z, _ = fx
    cfg = model.config.replace(use_separate_rgb_encoder_per_camera=True)
    flat = checkpoint.flat_params(model.params)
    sep = {}
    for k, v in flat.items():
        if k.startswith("diffusion.rgb_encoder."):
            for i in range(cfg.num_cameras):
                sep[k.replace("diffusion.rgb_encoder.", f"diffusion.rgb_encoder.{i}.")] = np.asarray(v)
        else:
            sep[k] = np.asarray(v)
    params = checkpoint.params_from_state_dict(sep, cfg)
    with pytest.raises(checkpoint.CheckpointError, match=r"rgb_encoder\.0\."):
        checkpoint.params_from_state_dict({k: np.asarray(v) for k, v in flat.items()}, cfg)
    gc = jax.jit(lambda p, o: dp.global_conditioning(cfg, p, o))(params, obs)
    np.testing.assert_allclose(gc, z["global_cond"], atol=1e-4, rtol=0)


def test_recording_is_bit_identical_and_covers_every_declared_hook(fx):
    model, obs, _, step_noise = fx
    noise = fx[2]["sample_init_noise"]
    plain, rec0 = model.sample_chunk(obs, noise, step_noise=step_noise)
    assert rec0 == {}
    recorded, rec = model.sample_chunk(obs, noise, step_noise=step_noise, records=(Record("*"),))
    np.testing.assert_array_equal(np.asarray(recorded), np.asarray(plain))
    table = dp.hook_table(model.config)
    assert set(rec) == set(table.names)  # the model calls exactly the declared points
    steps = model.config.inference_steps
    for name, arr in rec.items():
        point = table[name]
        assert arr.ndim == len(point.recorded_axes), name
        if point.per_step:
            assert arr.shape[0] == steps, name
    gh, gw = dp.attention_grid(model.config)["grid"]
    attn = np.asarray(rec["enc.wrist_image.attn"])
    assert attn.shape == (2, model.config.n_obs_steps, model.config.spatial_softmax_num_keypoints, gh * gw)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    # the keypoints are the expectation of the grid under the recorded attention
    xs = np.linspace(-1, 1, gw)[None, :].repeat(gh, 0).reshape(-1)
    np.testing.assert_allclose((attn * xs).sum(-1), np.asarray(rec["enc.wrist_image.keypoints"])[..., 0], atol=1e-5)
    # a step selector keeps only those steps
    _, last = model.sample_chunk(obs, noise, step_noise=step_noise, records=(Record("unet.out", steps="-1"),))
    np.testing.assert_array_equal(np.asarray(last["unet.out"])[0], np.asarray(rec["unet.out"])[-1])


def test_interventions_change_actions_and_zero_add_does_not(fx):
    model, obs, z, step_noise = fx
    noise = z["sample_init_noise"]
    plain, _ = model.sample_actions(obs, noise, step_noise=step_noise)
    # one encoder, conditioning and per-step UNet site: bit-identical
    zero_add = tuple(Intervention(site, "add", value=0.0) for site in ("cond.global", "enc.image.attn",
                                                                       "unet.mid.block.1"))
    same, _ = model.sample_actions(obs, noise, step_noise=step_noise, interventions=zero_add)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    # every hook point at once: XLA (CPU) fuses the extra adds into neighbouring kernels and may round the last
    # bit differently (seen: 1.7e-6 after 10 DDPM steps), so this is a tolerance, 4 orders below an edit's effect
    everywhere, _ = model.sample_actions(obs, noise, step_noise=step_noise,
                                         interventions=(Intervention("*", "add", value=0.0),))
    assert np.max(np.abs(np.asarray(everywhere) - np.asarray(plain))) <= 1e-5
    ablated, _ = model.sample_actions(obs, noise, step_noise=step_noise,
                                      interventions=(Intervention("cond.global", "scale", value=0.0),))
    assert np.max(np.abs(np.asarray(ablated) - np.asarray(plain))) > 1e-2
    # uniform spatial attention on one camera moves its keypoints to the centre and changes the actions
    uniform = Intervention("enc.image.attn", "replace", fn=lambda a: jnp.full_like(a, 1.0 / a.shape[-1]))
    moved, rec = model.sample_actions(obs, noise, step_noise=step_noise, interventions=(uniform,),
                                      records=(Record("enc.image.keypoints"), Record("enc.wrist_image.keypoints")))
    np.testing.assert_allclose(np.asarray(rec["enc.image.keypoints"]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rec["enc.wrist_image.keypoints"]), z["enc_keypoints"][:, :, 1], atol=1e-4)
    assert np.max(np.abs(np.asarray(moved) - np.asarray(plain))) > 1e-3
    # a step-restricted intervention acts only from that step on: steps before are untouched
    late, rec_late = model.sample_chunk(obs, noise, step_noise=step_noise, records=(Record("diffusion.x_t"),),
                                        interventions=(Intervention("unet.out", "scale", value=0.0, steps="5"),))
    _, rec_plain = model.sample_chunk(obs, noise, step_noise=step_noise, records=(Record("diffusion.x_t"),))
    x_late, x_plain = np.asarray(rec_late["diffusion.x_t"]), np.asarray(rec_plain["diffusion.x_t"])
    np.testing.assert_array_equal(x_late[:6], x_plain[:6])
    assert np.max(np.abs(x_late[6] - x_plain[6])) > 1e-3


def test_hook_request_errors_name_the_site(fx):
    model, obs, z, step_noise = fx
    with pytest.raises(ValueError, match=r"cond\.globl.*nearest valid names: cond\.global"):
        model.sample_chunk(obs, z["sample_init_noise"], step_noise=step_noise, records=(Record("cond.globl"),))
    with pytest.raises(ValueError, match="no token axis"):
        model.sample_chunk(obs, z["sample_init_noise"], step_noise=step_noise,
                           records=(Record("cond.global", tokens="0:2"),))


def test_batchnorm_backbone_keys_and_modes():
    """LeRobot's default backbone keeps BatchNorm: its running statistics are weights, and eval mode with running
    statistics equal to the batch's reproduces train mode (batch statistics)."""
    from openpi.models.diffusion import ops

    cfg = dp_config.load_config(POLICY).replace(use_group_norm=False)
    shapes = checkpoint.param_shapes(cfg)
    assert shapes["diffusion.rgb_encoder.backbone.1.running_var"] == (64,)
    assert shapes["diffusion.rgb_encoder.backbone.5.0.downsample.1.num_batches_tracked"] == ()
    x = jax.random.normal(jax.random.key(0), (4, 3, 5, 5)) * 2.0 + 1.0
    p = {"weight": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, -1.0, 3.0]),
         "running_mean": x.mean((0, 2, 3)), "running_var": x.var((0, 2, 3))}
    train = ops.batch_norm(p, x, train=True)
    np.testing.assert_allclose(ops.batch_norm(p, x, train=False), train, atol=1e-5)
    np.testing.assert_allclose(train[:, 1].mean(), -1.0, atol=1e-5)  # bias of channel 1
    stale = dict(p, running_mean=p["running_mean"] + 1.0)
    assert np.max(np.abs(ops.batch_norm(stale, x, train=False) - train)) > 0.1


def test_three_stage_unet_reads_exactly_its_declared_weights_and_hooks():
    """A deeper UNet than the fixture's (LeRobot's default has three stages): the weights ``param_shapes`` lists
    are the ones the forward reads, and every block name it calls is declared."""
    from openpi.models.diffusion import unet as dp_unet
    from openpi.models.hooks import Hooks
    from openpi.models.params_util import unflatten

    cfg = dp_config.load_config(POLICY).replace(down_dims=(16, 32, 64), diffusion_step_embed_dim=8, horizon=16)
    shapes = dp_unet.param_shapes(cfg)
    rng = np.random.default_rng(0)
    flat = {k.replace(".", "/"): jnp.asarray(rng.normal(0, 0.1, s), jnp.float32) for k, s in shapes.items()}
    params = unflatten(flat)["diffusion"]["unet"]
    table = dp.hook_table(cfg)
    hooks = Hooks(records=(Record("unet.*"),), table=table)
    b = 2
    x = jnp.asarray(rng.normal(size=(b, cfg.horizon, cfg.action_dim)), jnp.float32)
    out = dp_unet.unet(cfg, params, x, jnp.array([3, 70]), jnp.ones((b, cfg.global_cond_dim)),
                       hook=lambda n, v: hooks("unet." + n, v))
    assert out.shape == x.shape
    declared = {n for n in table.names if n.startswith("unet.")}
    assert set(hooks.collected) == declared
    assert hooks.collected["unet.down.1.downsample"].shape == (b, 32, 4)
    assert hooks.collected["unet.up.1.upsample"].shape == (b, 16, 16)
    # every listed weight is read by the forward (and nothing else is asked for)
    read: set[str] = set()

    class Tracked(dict):
        def __init__(self, tree, path):
            super().__init__(tree)
            self.path = path

        def __getitem__(self, key):
            value = super().__getitem__(key)
            name = f"{self.path}.{key}"
            if isinstance(value, dict):
                return Tracked(value, name)
            read.add(name)
            return value

    dp_unet.unet(cfg, Tracked(params, "diffusion.unet"), x, jnp.array([3, 70]), jnp.ones((b, cfg.global_cond_dim)))
    assert read == set(shapes)
