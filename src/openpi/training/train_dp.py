"""Training of a Diffusion Policy (LeRobot's architecture, our JAX port) on the same demos as Pi0.

Why beside ``openpi.training.train`` and not inside it: the model, its inputs (uint8 images per LeRobot key, no
prompt) and its checkpoint format (a LeRobot ``save_pretrained`` folder) differ; everything else is shared: the
demo reader (``DemoDataset``), the run directory with settings fingerprint and refusal of changed settings, the
optimizer and schedule, bit-exact checkpoints with resume, ``metrics.jsonl`` and ``loss.png``.
``openpi.training.train.train`` dispatches here for the names in :data:`PRESETS`.

Per step: ``batch_size`` random demo frames (the frame's images resized with padding to the config's (H, W) exactly
as ``DiffusionLiberoTransforms`` does at serving time, precomputed once), the 8-D state and the chunk
actions[t : t + horizon] (the last action repeated past the episode's end), normalised with LeRobot's modes
(images MEAN_STD per channel, state and actions MIN_MAX, statistics from the demos) -> LeRobot's loss (a random
crop per camera encoder call, noise ~ N(0, 1), timesteps ~ U{0..T-1}, MSE on the noise) -> AdamW. Buffers (the
spatial softmax's position grid) are not trained.

With ``n_obs_steps`` = 1 (the presets) the policy conditions on the current frame only, so the serving-side
history spacing question (docs/diffusion_policy.md) does not arise.

Output layout: as ``openpi.training.train`` (job ``diffusion-policy-train``), except that each
``checkpoints/<step:08d>/`` is a LeRobot-layout policy folder (``config.json``, ``model.safetensors``,
``policy_{pre,post}processor.json`` + statistics) served by ``create_policy("dp_lerobot", <that folder>)``, plus
``state.npz`` / ``meta.json`` for the resume.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from openpi.models.diffusion import checkpoint as dp_ckpt
from openpi.models.diffusion import encoder
from openpi.models.diffusion import model as dp
from openpi.models.diffusion.config import ACTION, OBS_STATE, DiffusionConfig, from_dict
from openpi.models.diffusion.init import init_params, is_buffer
from openpi.models.diffusion.normalize import FeatureNorm
from openpi.models.params_util import flatten, unflatten
from openpi.policies.diffusion_policy import DiffusionLiberoTransforms
from openpi.policies.libero_policy import IMAGE_KEY, STATE_KEY, WRIST_KEY
from openpi.shared.io import write_json_atomic
from openpi.shared.rundir import atomic_dir
from openpi.training import train as pi_train

logger = logging.getLogger(__name__)
RUN_JOB = "diffusion-policy-train"
NORM_EPS = 1e-8
AGENT_KEY, WRIST_FEATURE = "observation.images.image", "observation.images.wrist_image"

# Named network settings (LeRobot config.json keys). dp_tiny_spatial10: LeRobot's LIBERO-style two-camera DP at
# 96 x 96 with an 84 x 84 random crop, separate encoders per camera, a ResNet-18 trunk of width 16 (our
# extension, ``backbone_width``), a three-stage UNet of widths 32-128, 16-step chunks of which 8 are executed,
# DDPM sampling in 10 steps over 100 training timesteps; 2.77 M parameters, 11 MB. (The scheduler type changes
# only sampling, not the loss. DDIM, tried first, sampled worse chunks from the same weights: on 16 training
# frames at step 1,500 the chunk MSE was 0.27 with DDIM in 100 steps vs 0.15 with DDPM in 10.)
PRESETS: dict[str, dict[str, Any]] = {
    "dp_tiny_spatial10": {
        "n_obs_steps": 1, "horizon": 16, "n_action_steps": 8,
        "input_features": {AGENT_KEY: {"type": "VISUAL", "shape": [3, 96, 96]},
                           WRIST_FEATURE: {"type": "VISUAL", "shape": [3, 96, 96]},
                           OBS_STATE: {"type": "STATE", "shape": [8]}},
        "output_features": {ACTION: {"type": "ACTION", "shape": [7]}},
        "normalization_mapping": {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"},
        "vision_backbone": "resnet18", "backbone_width": 16, "crop_shape": [84, 84], "crop_is_random": True,
        "use_group_norm": True, "spatial_softmax_num_keypoints": 32, "use_separate_rgb_encoder_per_camera": True,
        "down_dims": [32, 64, 128], "kernel_size": 5, "n_groups": 8, "diffusion_step_embed_dim": 64,
        "use_film_scale_modulation": True, "noise_scheduler_type": "DDPM", "num_train_timesteps": 100,
        "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon",
        "clip_sample": True, "clip_sample_range": 1.0, "num_inference_steps": 10,
    },
}
# The smallest network of the same shape (32 x 32 images, one feature-map cell): tests and smoke runs.
PRESETS["dp_micro"] = {**PRESETS["dp_tiny_spatial10"], "horizon": 8, "n_action_steps": 5,
                       "input_features": {AGENT_KEY: {"type": "VISUAL", "shape": [3, 32, 32]},
                                          WRIST_FEATURE: {"type": "VISUAL", "shape": [3, 32, 32]},
                                          OBS_STATE: {"type": "STATE", "shape": [8]}},
                       "crop_shape": [28, 28], "spatial_softmax_num_keypoints": 4, "down_dims": [16, 32],
                       "diffusion_step_embed_dim": 16, "num_inference_steps": 2}


def preset(name: str) -> tuple[dict[str, Any], DiffusionConfig]:
    """(config.json dict, parsed config) of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown Diffusion Policy preset {name!r}; available: {sorted(PRESETS)}")
    raw = copy.deepcopy(PRESETS[name])
    return raw, from_dict(raw, f"preset {name}")


# ------------------------------------------------------------------------------------------------ data


class DPFrames:
    """Every demo frame as the policy sees it: uint8 (N, 3, H, W) per camera, raw state (N, 8), chunk (N, horizon,
    7). Images are resized once up front (the resize is most of a frame's preprocessing)."""

    def __init__(self, dataset: pi_train.DemoDataset, config: DiffusionConfig, progress: bool = True) -> None:
        transforms = DiffusionLiberoTransforms(config)
        self.keys = config.image_keys
        n = len(dataset)
        h, w = config.image_shape[1:]
        self.images = {k: np.empty((n, 3, h, w), np.uint8) for k in self.keys}
        self.states = np.empty((n, 8), np.float32)
        self.chunks = np.empty((n, dataset.horizon, 7), np.float32)
        for i in tqdm(range(n), desc="resize demo frames", disable=not progress):
            item = dataset.item(i)
            frame = transforms.inputs({IMAGE_KEY: item[IMAGE_KEY], WRIST_KEY: item[WRIST_KEY],
                                       STATE_KEY: item[STATE_KEY]})
            for k in self.keys:
                self.images[k][i] = frame["images"][k]
            self.states[i] = frame["raw_state"]
            self.chunks[i] = item["actions"]
        self.all_states, self.all_actions = dataset.all_states_actions(delta_actions=False)

    def __len__(self) -> int:
        return len(self.states)

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """LeRobot-style statistics: per-channel (3, 1, 1) of images in [0, 1]; per-dim of every state / action."""
        out = {}
        for k, imgs in self.images.items():
            per_channel = imgs.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64) / 255.0
            out[k] = {name: fn(per_channel, axis=1).astype(np.float32).reshape(3, 1, 1)
                      for name, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))}
        for k, arr in ((OBS_STATE, self.all_states), (ACTION, self.all_actions)):
            out[k] = {name: fn(arr, axis=0).astype(np.float32)
                      for name, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))}
        return out

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"images": {k: v[rows] for k, v in self.images.items()}, "state": self.states[rows],
                "actions": self.chunks[rows]}


# ------------------------------------------------------------------------------------------------ step


def _norms(config: DiffusionConfig, stats: dict) -> dict[str, FeatureNorm]:
    modes = {OBS_STATE: config.norm_mode("STATE"), ACTION: config.norm_mode("ACTION"),
             **{k: config.norm_mode("VISUAL") for k in config.image_keys}}
    return {k: FeatureNorm(m, stats[k], NORM_EPS) for k, m in modes.items()}


@functools.lru_cache(maxsize=8)
def make_train_step(config: DiffusionConfig, optimizer: optax.GradientTransformation):
    """jit(params, opt_state, batch, rng, stats, trainable) -> (params, opt_state, {loss, grad_norm}).

    ``stats``: feature -> {stat: array} (the normalisation, applied inside the step to uint8 images and raw
    states / chunks); ``trainable``: a tree of 0/1 like params (0 for buffers, whose gradient is zeroed and value
    kept). Both are arguments, not constants, so the compiled step is cached per (config, optimizer) and a resume
    in the same process does not compile again.
    """

    def loss_fn(params, batch, rng, stats):
        norms = _norms(config, stats)
        k_crop, k_loss = jax.random.split(rng)
        images = {k: norms[k].normalize(batch["images"][k].astype(jnp.float32)[:, None] / 255.0)
                  for k in config.image_keys}
        obs = dp.Observation(images=images, state=norms[OBS_STATE].normalize(batch["state"])[:, None])
        actions = norms[ACTION].normalize(batch["actions"])
        separate = config.use_separate_rgb_encoder_per_camera
        crops = encoder.random_crop_offsets(config, k_crop, config.num_cameras if separate else 1)
        return dp.compute_loss(config, params, obs, actions, rng=k_loss, crop=crops if separate else crops[0],
                               train=True)

    def step(params, opt_state, batch, rng, stats, trainable):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng, stats)
        grads = jax.tree.map(lambda g, m: g * m, grads, trainable)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        new = jax.tree.map(lambda n, p, m: jnp.where(m > 0, n, p), new, params, trainable)
        return new, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


def trainable_mask(params: dict) -> dict:
    flat = flatten(params)
    return unflatten({k: jnp.asarray(0.0 if is_buffer(k.replace("/", ".")) else 1.0) for k in flat})


# ------------------------------------------------------------------------------------------------ run


def run_settings(cfg: pi_train.TrainConfig, dataset: pi_train.DemoDataset, raw_config: dict) -> dict[str, Any]:
    return {"train": cfg, "network": raw_config, "demos": pi_train.demos_settings(dataset)}


def _check_options(cfg: pi_train.TrainConfig) -> None:
    """Pi0-only options are errors for a Diffusion Policy, not silently ignored."""
    bad = [f"--{name.replace('_', '-')}" for name, off in
           (("init_checkpoint", None), ("tokenizer", None), ("fast_tokenizer", None), ("dtype", None),
            ("augment", False)) if getattr(cfg, name) != off]
    if bad:
        raise ValueError(f"{bad} apply to Pi0-family training only; a Diffusion Policy ({cfg.policy_config}) "
                         "trains from a random init in float32 and augments by its own random crop")


def package_checkpoint(step_dir: str | pathlib.Path, dest: str | pathlib.Path) -> pathlib.Path:
    """Copy the servable LeRobot folder of a training checkpoint (without optimizer state) to ``dest``, with the
    checkpoint's metadata as train_meta.json."""
    step_dir, dest = pathlib.Path(step_dir), pathlib.Path(dest)
    if not (step_dir / "meta.json").is_file() or not (step_dir / dp_ckpt.WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{step_dir} is not a complete Diffusion Policy training checkpoint")
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; refusing to overwrite it")
    with atomic_dir(dest) as tmp:
        for f in step_dir.iterdir():
            if f.name not in ("state.npz", "meta.json"):
                shutil.copy(f, tmp / f.name)
        meta = json.loads((step_dir / "meta.json").read_text())
        write_json_atomic(tmp / "train_meta.json", {k: v for k, v in meta.items() if k != "num_leaves"})
    return dest


def train(cfg: pi_train.TrainConfig, progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) a Diffusion Policy preset; same contract and return value as ``train.train``."""
    _check_options(cfg)
    end = cfg.num_steps if stop_at is None else min(stop_at, cfg.num_steps)
    raw_config, config = preset(cfg.policy_config)
    dataset = pi_train.DemoDataset(cfg.demo_dirs, config.horizon)
    run = pi_train.open_run(cfg, run_settings(cfg, dataset, raw_config), RUN_JOB)
    out_dir = run.root
    frames = DPFrames(dataset, config, progress)
    stats = frames.stats()
    optimizer, schedule = pi_train.make_optimizer(cfg)
    ckpts = pi_train.checkpoints(out_dir, cfg.keep_last)
    metrics_path = out_dir / "metrics.jsonl"
    params, opt_state, rng, start, saved = pi_train.resume_or_init(
        ckpts, optimizer, cfg.seed, lambda d: dp_ckpt.load_policy(d)[1], lambda: init_params(config, cfg.seed),
        metrics_path)
    num_params = int(sum(np.prod(s) for k, s in dp_ckpt.param_shapes(config).items() if not is_buffer(k)))
    logger.info("%s: %d parameters, %d demo frames in %d episodes", cfg.policy_config, num_params, len(frames),
                len(dataset.episodes))
    compiled = make_train_step(config, optimizer)
    stats_tree, trainable = jax.tree.map(jnp.asarray, stats), trainable_mask(params)

    def train_step(params, opt_state, batch, rng):
        return compiled(params, opt_state, batch, rng, stats_tree, trainable)

    def batch_for(step: int):
        rows = np.random.default_rng([cfg.seed, step]).integers(0, len(frames), cfg.batch_size)
        return (frames.batch(rows),)

    def servable(params):
        return lambda step_dir: dp_ckpt.save_policy(step_dir, raw_config, jax.device_get(params), stats, NORM_EPS)

    meta = {"policy_config": cfg.policy_config, "model": "diffusion", "num_params": num_params,
            "demo_dirs": list(cfg.demo_dirs), "num_frames": len(frames), "fingerprint": run.fingerprint}
    saved = pi_train.run_loop(cfg, (params, opt_state, rng), start, end, train_step, batch_for, schedule, ckpts,
                              meta, servable, out_dir, saved, progress)
    return pi_train.result(metrics_path, max(end, start), saved, num_params)
