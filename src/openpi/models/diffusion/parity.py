"""Check our Diffusion Policy against numbers produced by LeRobot itself (shared/fixtures/lerobot_ref/).

    python -m openpi.models.diffusion.parity /path/to/lerobot_ref/            # folder with the npz + policy
    python -m openpi.models.diffusion.parity /path/to/diffusion_tiny_io.npz   # policy folder = diffusion_tiny/

Loads the saved LeRobot policy folder (config.json, model.safetensors, processor statistics), runs our model on the
fixture's raw inputs with the fixture's random draws, and compares **every** array of the npz that is not one of
those inputs. An array it has no way to compute is a failure, never skipped. Prints JSON
``{"max_abs_diff": {key: diff}, "failures": [...], "ok": bool, ...}``; exits 0 when ok, 1 otherwise.

Tolerances: float arrays max |ours - LeRobot| <= --tolerance (default 1e-4); integer arrays (timestep tables) must
be equal. Matmuls and convolutions run at full float32 precision (jax_default_matmul_precision=highest), so the
numbers do not depend on an accelerator's reduced-precision defaults.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from openpi.models.diffusion import model as dp
from openpi.models.diffusion import schedulers, unet
from openpi.models.diffusion.policy import DiffusionPolicyModel, PolicyRunner, image_to_float
from openpi.models.diffusion.spatial_softmax import pos_grid
from openpi.models.hooks import Hooks, Record

NPZ_NAME = "diffusion_tiny_io.npz"
# Arrays the fixture feeds in (LeRobot's inputs and its random draws): used, not compared.
INPUTS = {
    "obs_state_raw": "raw state", "action_raw": "raw action chunk", "action_is_pad": "padding mask",
    "unet_noisy_actions": "UNet input", "unet_timesteps": "UNet input", "loss_crop_top_left": "random crop drawn",
    "loss_eps": "loss noise drawn", "loss_timesteps": "loss timesteps drawn", "sample_init_noise": "x_T",
    "ddpm_step_noise": "DDPM variance noise drawn", "loss_torch_seed": "torch seed (torch RNG not reproduced)",
    "sample_torch_seed": "torch seed (torch RNG not reproduced)",
}
UNET_BLOCKS = {r"unet_down(\d+)_out": "unet.down.{}.block.1", r"unet_mid_out": "unet.mid.block.1",
               r"unet_up(\d+)_out": "unet.up.{}.block.1", r"unet_up(\d+)_upsampled": "unet.up.{}.upsample",
               r"unet_timestep_embedding": "unet.time_emb", r"unet_output": "unet.out"}
ENC_STAGES = {"enc_feature_map": "layer4", "enc_keypoint_logits": "kp_logits", "enc_keypoints": "keypoints",
              "enc_features": "features"}


def resolve_paths(path: pathlib.Path, policy_dir: pathlib.Path | None) -> tuple[pathlib.Path, pathlib.Path]:
    """(npz, policy folder) from a fixture folder or an npz path."""
    npz = path / NPZ_NAME if path.is_dir() else path
    if not npz.is_file():
        raise FileNotFoundError(f"fixture {npz} not found")
    if policy_dir is None:
        policy_dir = npz.parent / npz.name.removesuffix(".npz").removesuffix("_io")
    if not policy_dir.is_dir():
        raise FileNotFoundError(f"LeRobot policy folder {policy_dir} not found (pass --policy-dir)")
    return npz, policy_dir


def _fixture_cam(key: str) -> str:
    """Fixture array name part of an image key: 'observation.wrist_image' -> 'wrist_image'."""
    return key.removeprefix("observation.").replace(".", "_")


def input_keys(config) -> set[str]:
    """Fixture arrays that are inputs for this config (the raw camera images included)."""
    return set(INPUTS) | {f"obs_{_fixture_cam(k)}_uint8" for k in config.image_keys}


def _record(config, names: list[str]):
    records = tuple(Record(n) for n in names)
    return Hooks(records=records, table=dp.hook_table(config))


def compute_outputs(model: DiffusionPolicyModel, z: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our value of every fixture array we know how to compute."""
    cfg, ours = model.config, {}
    cams = {k: _fixture_cam(k) for k in cfg.image_keys}
    names = dp.camera_names(cfg)
    raw = {k: z[f"obs_{c}_uint8"] for k, c in cams.items()}
    raw["observation.state"] = z["obs_state_raw"]
    for k, c in cams.items():
        ours[f"obs_{c}_float"] = image_to_float(raw[k])
    obs = model.prepare(raw)
    for k, c in cams.items():
        ours[f"obs_{c}_norm"] = obs.images[k]
    ours["obs_state_norm"] = obs.state
    action_norm = model.normalize_actions(z["action_raw"])
    ours["action_norm"] = action_norm
    for feature, fn in model.normalizer.pre.items():
        for stat, value in fn.stats.items():
            ours[f"stats__{feature}__{stat}"] = value

    # encoder and conditioning, through the hook points
    enc_names = [f"enc.{names[k]}.{stage}" for k in cfg.image_keys for stage in ENC_STAGES.values()]

    @jax.jit
    def encode(params, obs):
        hooks = _record(cfg, [*enc_names, "cond.global"])
        dp.global_conditioning(cfg, params, obs, hooks=hooks)
        return hooks.collected

    rec = encode(model.params, obs)
    for key, stage in ENC_STAGES.items():
        ours[key] = jnp.stack([rec[f"enc.{names[k]}.{stage}"] for k in cfg.image_keys], axis=2)
    ours["global_cond"] = rec["cond.global"]
    ours["spatial_softmax_pos_grid"] = pos_grid(*cfg.feature_map_hw)

    # UNet on fixed inputs, every block through its hook point
    x, t = jnp.asarray(z["unet_noisy_actions"]), jnp.asarray(z["unet_timesteps"], jnp.int32)
    block_keys = {}
    for key in z:
        for pattern, name in UNET_BLOCKS.items():
            m = re.fullmatch(pattern, key)
            if m:
                block_keys[key] = name.format(*m.groups())

    @jax.jit
    def run_unet(params, gc):
        hooks = _record(cfg, sorted(set(block_keys.values())))
        unet.unet(cfg, params["diffusion"]["unet"], x, t, gc, hook=lambda n, v: hooks("unet." + n, v))
        return hooks.collected

    rec = run_unet(model.params, ours["global_cond"])
    for key, name in block_keys.items():
        ours[key] = rec[name]
    ours["unet_timestep_sinusoidal"] = unet.timestep_sinusoidal(t, cfg.diffusion_step_embed_dim)

    # training loss: train mode with LeRobot's random crop, and eval mode (centre crop)
    train = model.loss_terms(obs, action_norm, z["loss_eps"], z["loss_timesteps"], crop=z["loss_crop_top_left"],
                             action_is_pad=z["action_is_pad"], train=True)
    ours.update(loss_noisy_actions=train["noisy_actions"], loss_global_cond_train=train["global_cond"],
                loss_pred_train=train["pred"], loss_train=train["loss"])
    evaluation = model.loss_terms(obs, action_norm, z["loss_eps"], z["loss_timesteps"],
                                  action_is_pad=z["action_is_pad"], train=False)
    ours.update(loss_pred_eval_centercrop=evaluation["pred"], loss_eval_centercrop=evaluation["loss"])

    # sampling with fixed noise, both schedulers, and select_action queueing
    sched = schedulers.make_schedule(cfg)
    ours.update(sched_betas=sched.betas, sched_alphas_cumprod=sched.alphas_cumprod)
    step_noise = np.zeros((cfg.inference_steps, *z["sample_init_noise"].shape), np.float32)
    noisy_steps = np.flatnonzero(sched.timesteps > 0)  # diffusers draws variance noise only where t > 0
    if len(noisy_steps) != len(z["ddpm_step_noise"]):
        raise ValueError(f"fixture has {len(z['ddpm_step_noise'])} DDPM step noises, our schedule draws "
                         f"{len(noisy_steps)}")
    step_noise[noisy_steps] = z["ddpm_step_noise"]
    frame = jax.tree.map(lambda a: a[:, -1], obs)  # select_action is fed the last frame
    for kind in ("DDPM", "DDIM"):
        m = model.with_config(noise_scheduler_type=kind)
        tag = kind.lower()
        ours[f"{tag}_timesteps"] = schedulers.make_schedule(m.config).timesteps
        chunk, rec = m.sample_chunk(obs, z["sample_init_noise"], step_noise=step_noise,
                                    records=(Record("diffusion.x_t"), Record("unet.out")))
        actions = chunk[:, dp.action_slice(cfg)]
        ours.update({f"{tag}_trace_x": rec["diffusion.x_t"], f"{tag}_trace_model_output": rec["unet.out"],
                     f"{tag}_sample_full": chunk, f"{tag}_actions": actions,
                     f"{tag}_actions_unnorm": m.unnormalize_actions(actions)})
        runner = PolicyRunner(m)
        picked = jnp.stack([runner.select_action(frame, noise=z["sample_init_noise"], step_noise=step_noise)
                            for _ in range(cfg.n_action_steps)], axis=1)
        ours[f"select_action_{tag}_actions"] = picked
        ours[f"select_action_{tag}_actions_unnorm"] = m.unnormalize_actions(picked)
    return {k: np.asarray(v) for k, v in ours.items()}


def compare(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray], inputs: set[str],
            tolerance: float) -> dict:
    """Max |diff| per reference array (inputs excluded); anything not computed or mis-shaped fails."""
    diffs: dict[str, float | str] = {}
    failures = []
    for key in sorted(set(reference) - inputs):
        ref = reference[key]
        if key not in ours:
            diffs[key] = "not computed"
            failures.append(key)
            continue
        mine = ours[key]
        if mine.shape != ref.shape:
            diffs[key] = f"shape {mine.shape} != reference {ref.shape}"
            failures.append(key)
            continue
        if np.issubdtype(ref.dtype, np.integer) or ref.dtype == bool:
            diff = float(np.max(np.abs(mine.astype(np.int64) - ref.astype(np.int64)), initial=0))
            bad = diff != 0
        else:
            diff = float(np.max(np.abs(mine.astype(np.float64) - ref.astype(np.float64)), initial=0))
            bad = not diff <= tolerance  # NaN fails
        diffs[key] = diff
        if bad:
            failures.append(key)
    return {"max_abs_diff": diffs, "failures": failures, "ok": not failures}


def run_parity(path: pathlib.Path, policy_dir: pathlib.Path | None = None, tolerance: float = 1e-4) -> dict:
    npz, folder = resolve_paths(pathlib.Path(path), policy_dir)
    with np.load(npz) as f:
        reference = {k: f[k] for k in f.files}
    model = DiffusionPolicyModel.load(folder)
    try:
        ours = compute_outputs(model, reference)
    except KeyError as exc:
        raise KeyError(f"{npz}: fixture lacks input {exc}") from None
    inputs = input_keys(model.config)
    report = {"fixture": str(npz), "policy": str(folder), "tolerance": tolerance, "integer_tolerance": 0,
              "inputs": sorted(k for k in reference if k in inputs)}
    report.update(compare(ours, reference, inputs, tolerance))
    return report


@dataclasses.dataclass
class Args:
    fixture: tyro.conf.Positional[pathlib.Path]
    """fixture folder (holding diffusion_tiny_io.npz and diffusion_tiny/) or the npz itself"""
    policy_dir: pathlib.Path | None = None
    """LeRobot policy folder; default: next to the npz, named like it without '_io'"""
    tolerance: float = 1e-4
    """max |ours - LeRobot| for every float array; integer arrays (timesteps) must match exactly"""


def main() -> None:
    args = tyro.cli(Args, description=__doc__)
    jax.config.update("jax_default_matmul_precision", "highest")
    report = run_parity(args.fixture, args.policy_dir, args.tolerance)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
