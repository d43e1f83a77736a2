"""Diffusion Policy (Chi et al. 2023, LeRobot's ``DiffusionModel``): observation encoding, loss and sampling.

Pure functions over the parameter tree in LeRobot's key layout (``params["diffusion"]["unet"]...``), taking
*normalised* inputs as LeRobot's model does (its processors normalise outside the model; see
:mod:`openpi.models.diffusion.normalize` and :class:`openpi.models.diffusion.policy.DiffusionPolicyModel`).
Every random draw is an explicit argument (crop offsets, loss noise and timesteps, initial and per-step sampling
noise), so LeRobot's numbers can be reproduced from the arrays it drew.

Hook points (all declared in :func:`hook_points`; ``<cam>`` from :func:`camera_name`):

- ``enc.<cam>.stem``, ``enc.<cam>.layer1..4``: ResNet stage maps, axes (batch, obs_step, channel, height, width);
- ``enc.<cam>.kp_logits`` (batch, obs_step, keypoint, height, width): spatial-softmax logits;
- ``enc.<cam>.attn`` (batch, obs_step, keypoint, location): the spatial softmax, a distribution over the
  feature-map cells of each keypoint, location = h * W + w (row-major) on the grid of :func:`attention_grid`;
- ``enc.<cam>.keypoints`` (batch, obs_step, keypoint, xy) and ``enc.<cam>.features`` (batch, obs_step, feature);
- ``cond.global`` (batch, d_cond): the conditioning vector, per obs step [state, cameras..., env state];
- per denoising step: ``diffusion.timestep`` (batch,), ``diffusion.x_t`` (batch, horizon, action_dim),
  ``unet.time_emb``, ``unet.cond`` (batch, d), every UNet block (batch, channel, horizon), ``unet.out`` (the
  predicted noise, or the clean chunk for prediction_type "sample") and ``diffusion.pred_x0`` (clipped clean
  chunk the scheduler steps towards).

"horizon" is the action-chunk time axis (halved per UNet down stage), named so to keep "time"/"timestep" for the
diffusion process. The encoder runs once per call (no step axis); per-step points get a leading step axis holding
the requested steps.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from openpi.models.diffusion import encoder, schedulers, unet
from openpi.models.diffusion.config import DiffusionConfig
from openpi.models.hooks import NO_HOOKS, HookPoint, Hooks, HookTable, Intervention, Record, resolve_steps

ENC_AXES = {"map": ("batch", "obs_step", "channel", "height", "width"),
            "kp_logits": ("batch", "obs_step", "keypoint", "height", "width"),
            "attn": ("batch", "obs_step", "keypoint", "location"),
            "keypoints": ("batch", "obs_step", "keypoint", "xy"),
            "features": ("batch", "obs_step", "feature")}
CHUNK_AXES = ("batch", "horizon", "action_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    """Normalised model inputs with an observation-history axis S = n_obs_steps (oldest first).

    ``images``: LeRobot feature key -> (B, S, 3, H, W) float32; ``state``: (B, S, state_dim); ``env_state``:
    (B, S, env_dim) when the config has ``observation.environment_state``.
    """

    images: dict[str, jax.Array]
    state: jax.Array
    env_state: jax.Array | None = None


# ------------------------------------------------------------------------------------------------ hook table


def camera_name(key: str) -> str:
    """Hook-name form of a LeRobot image key: 'observation.images.front' -> 'front', 'observation.image' ->
    'image', 'observation.wrist_image' -> 'wrist_image' (remaining dots become '_')."""
    for prefix in ("observation.images.", "observation."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return re.sub(r"[^A-Za-z0-9_]", "_", key)


def camera_names(config: DiffusionConfig) -> dict[str, str]:
    names = {k: camera_name(k) for k in config.image_keys}
    if len(set(names.values())) != len(names):
        raise ValueError(f"image keys {list(names)} give clashing hook names {list(names.values())}")
    return names


def attention_grid(config: DiffusionConfig) -> dict:
    """How ``enc.<cam>.attn`` maps onto a camera image, for the attention-object IoU tools.

    Returns ``grid`` (H, W) of the feature map (P = H * W locations, row-major, the IoU tools' per-camera patch
    layout) and ``crop_box`` (top, left, height, width): the image region the encoder saw at inference (LeRobot's
    eval-mode centre crop; the whole image without a crop). Location l = h * W + w is assigned the cell
    [top + h * height / H, top + (h + 1) * height / H) x [left + w * width / W, ...) of that region: pool object
    masks cropped to ``crop_box`` onto ``grid``. This is the stride geometry only; each cell's receptive field
    spans most of the crop.
    """
    top, left = encoder.center_crop_offsets(config)
    h, w = config.encoder_input_hw
    return {"grid": config.feature_map_hw, "crop_box": (top, left, h, w), "image_hw": tuple(config.image_shape[1:])}


def hook_points(config: DiffusionConfig) -> list[HookPoint]:
    """Every hook point :func:`sample_actions` calls, in call order."""
    pts: list[HookPoint] = []
    gh, gw = config.feature_map_hw
    for key, cam in camera_names(config).items():
        for stage in encoder.HOOK_STAGES:
            kind = stage if stage in ENC_AXES else "map"
            what = {"stem": "ResNet stem (conv1, norm, ReLU, maxpool)",
                    "kp_logits": "spatial-softmax logits (1x1 conv of layer4)",
                    "attn": f"spatial-softmax attention over the {gh}x{gw} feature-map cells (location = h*{gw}+w)",
                    "keypoints": "expected [x, y] in [-1, 1] per keypoint",
                    "features": "image feature after Linear + ReLU (enters the conditioning)"}.get(
                stage, f"ResNet {stage} output")
            pts.append(HookPoint(f"enc.{cam}.{stage}", ENC_AXES[kind], description=f"{what}, camera {key}",
                                 group=f"enc.{stage}"))
    pts.append(HookPoint("cond.global", ("batch", "d_cond"),
                         description="global conditioning: per obs step [state, camera features..., env state]",
                         group="cond.global"))
    pts.append(HookPoint("diffusion.timestep", ("batch",), True, description="scheduler timestep of the step",
                         group="diffusion.timestep"))
    pts.append(HookPoint("diffusion.x_t", CHUNK_AXES, True, description="noisy action chunk entering the step",
                         group="diffusion.x_t"))
    pts.append(HookPoint("unet.time_emb", ("batch", "d_time"), True, description="timestep embedding (MLP output)",
                         group="unet.time_emb"))
    pts.append(HookPoint("unet.cond", ("batch", "d_film"), True,
                         description="FiLM conditioning [timestep embedding, global conditioning]", group="unet.cond"))
    for name, c, t in unet.block_names(config):
        group = "unet." + re.sub(r"\.\d+", "", name)
        pts.append(HookPoint(f"unet.{name}", ("batch", "channel", "horizon"), True,
                             description=f"UNet {name} output ({c} channels, {t} positions)", group=group))
    pts.append(HookPoint("unet.out", CHUNK_AXES, True, description="UNet output: predicted noise (epsilon) or clean "
                         "chunk (sample prediction)", group="unet.out"))
    pts.append(HookPoint("diffusion.pred_x0", CHUNK_AXES, True,
                         description="clipped predicted clean chunk the scheduler steps towards",
                         group="diffusion.pred_x0"))
    return pts


def hook_table(config: DiffusionConfig) -> HookTable:
    """Diffusion Policy has no token sequence: no spans, no token axes."""
    return HookTable(hook_points(config), {}, 0)


def _prefixed(hooks: Hooks, prefix: str):
    return lambda name, x: hooks(prefix + name, x)


# ------------------------------------------------------------------------------------------------ encoding


def encode_images(config: DiffusionConfig, params: dict, obs: Observation, crop: jax.Array | None = None,
                  train: bool = False, hooks: Hooks = NO_HOOKS) -> jax.Array:
    """(B, S, num_cameras, feature) image features.

    A shared encoder sees all B*S*N images in one call, in (b, s, n) order (as LeRobot, which matters only for
    BatchNorm batch statistics); separate encoders one call per camera. ``crop``: None = centre crop; (2,) =
    (top, left) for every call; (num_cameras, 2) = per camera (separate encoders only, where LeRobot draws one
    crop per encoder call).
    """
    enc_p = params["diffusion"]["rgb_encoder"]
    keys = config.image_keys
    missing = [k for k in keys if k not in obs.images]
    if missing:
        raise KeyError(f"observation lacks image(s) {missing}; the policy expects {list(keys)}")
    imgs = jnp.stack([jnp.asarray(obs.images[k], jnp.float32) for k in keys], axis=2)  # (B, S, N, 3, H, W)
    if imgs.shape[3:] != tuple(config.image_shape):
        raise ValueError(f"images have shape {imgs.shape[3:]} per frame, config expects {config.image_shape}")
    b, s = imgs.shape[:2]
    cams = list(camera_names(config).values())
    crop = None if crop is None else jnp.asarray(crop, jnp.int32)
    if crop is not None and crop.ndim == 2 and not config.use_separate_rgb_encoder_per_camera:
        raise ValueError("per-camera crops (num_cameras, 2) need separate encoders; a shared encoder takes one "
                         "(top, left) per call, as LeRobot's RandomCrop")
    groups = ([range(len(keys))] if not config.use_separate_rgb_encoder_per_camera
              else [range(i, i + 1) for i in range(len(keys))])
    feats = []
    for g, idx in enumerate(groups):
        p = enc_p[str(g)] if config.use_separate_rgb_encoder_per_camera else enc_p
        x = imgs[:, :, idx.start:idx.stop].reshape(b * s * len(idx), *imgs.shape[3:])
        top_left = None if crop is None else (crop[g] if crop.ndim == 2 else crop)

        def hook(stage, v, idx=idx):
            # One hook call per camera; the batch is split only when something is requested, so with no request
            # the graph is the plain one.
            if hooks.empty:
                return v
            per = v.reshape(b, s, len(idx), *v.shape[1:])
            edited = [hooks(f"enc.{cams[i]}.{stage}", per[:, :, n]) for n, i in enumerate(idx)]
            return jnp.stack(edited, axis=2).reshape(v.shape)

        f = encoder.rgb_encoder(config, p, x, top_left, train, hook)
        feats.append(f.reshape(b, s, len(idx), -1))
    return jnp.concatenate(feats, axis=2)


def global_conditioning(config: DiffusionConfig, params: dict, obs: Observation, crop: jax.Array | None = None,
                        train: bool = False, hooks: Hooks = NO_HOOKS) -> jax.Array:
    """(B, n_obs_steps * obs_cond_dim): per step [state, camera 0 feature, camera 1 feature, ..., env state]."""
    state = jnp.asarray(obs.state, jnp.float32)
    if state.ndim != 3 or state.shape[1:] != (config.n_obs_steps, config.state_dim):
        raise ValueError(f"state has shape {state.shape}, expected (B, {config.n_obs_steps}, {config.state_dim})")
    b, s = state.shape[:2]
    parts = [state]
    if config.image_keys:
        parts.append(encode_images(config, params, obs, crop, train, hooks).reshape(b, s, -1))
    if config.env_state_dim:
        if obs.env_state is None:
            raise KeyError("the policy expects observation.environment_state; Observation.env_state is None")
        env = jnp.asarray(obs.env_state, jnp.float32)
        if env.shape != (b, s, config.env_state_dim):
            raise ValueError(f"env_state has shape {env.shape}, expected {(b, s, config.env_state_dim)}")
        parts.append(env)
    return hooks("cond.global", jnp.concatenate(parts, axis=-1).reshape(b, -1))


# ------------------------------------------------------------------------------------------------ training loss


def loss_terms(config: DiffusionConfig, params: dict, obs: Observation, actions: jax.Array, noise: jax.Array,
               timesteps: jax.Array, *, crop: jax.Array | None = None, action_is_pad: jax.Array | None = None,
               train: bool = True) -> dict[str, jax.Array]:
    """LeRobot's ``compute_loss`` with its random draws given: noise (B, horizon, A), timesteps (B,) int, crop.

    ``actions`` are normalised (B, horizon, A). Returns global_cond, noisy_actions, pred, target and loss (mean
    squared error over all elements, or over non-padded steps with ``do_mask_loss_for_padding``).
    """
    schedule = schedulers.make_schedule(config)
    actions = jnp.asarray(actions, jnp.float32)
    if actions.shape[1:] != (config.horizon, config.action_dim):
        raise ValueError(f"actions have shape {actions.shape}, expected (B, {config.horizon}, {config.action_dim})")
    global_cond = global_conditioning(config, params, obs, crop, train)
    noisy = schedulers.add_noise(schedule, actions, noise, timesteps)
    pred = unet.unet(config, params["diffusion"]["unet"], noisy, timesteps, global_cond)
    target = noise if config.prediction_type == "epsilon" else actions
    err = jnp.square(pred - target)
    if config.do_mask_loss_for_padding:
        if action_is_pad is None:
            raise ValueError("do_mask_loss_for_padding needs action_is_pad (B, horizon)")
        mask = (~jnp.asarray(action_is_pad, bool))[..., None].astype(err.dtype)
        loss = jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask) * err.shape[-1], 1)
    else:
        loss = jnp.mean(err)
    return {"global_cond": global_cond, "noisy_actions": noisy, "pred": pred, "target": target, "loss": loss}


def compute_loss(config: DiffusionConfig, params: dict, obs: Observation, actions: jax.Array, *,
                 rng: jax.Array | None = None, noise: jax.Array | None = None, timesteps: jax.Array | None = None,
                 crop: jax.Array | None = None, action_is_pad: jax.Array | None = None,
                 train: bool = True) -> jax.Array:
    """Scalar training loss. Noise ~ N(0, 1) and timesteps ~ U{0..num_train_timesteps-1} are drawn from ``rng``
    unless given; the crop is the centre crop unless given (draw one with ``encoder.random_crop_offsets``)."""
    b = actions.shape[0]
    if noise is None or timesteps is None:
        if rng is None:
            raise ValueError("compute_loss needs rng unless both noise and timesteps are given")
        k_noise, k_t = jax.random.split(rng)
        noise = jax.random.normal(k_noise, actions.shape) if noise is None else noise
        timesteps = (jax.random.randint(k_t, (b,), 0, config.num_train_timesteps) if timesteps is None
                     else timesteps)
    return loss_terms(config, params, obs, actions, noise, timesteps, crop=crop, action_is_pad=action_is_pad,
                      train=train)["loss"]


# ------------------------------------------------------------------------------------------------ sampling


def _step_noise(config: DiffusionConfig, step_noise, rng, shape, num_steps):
    if not schedulers.uses_step_noise(config):
        return jnp.zeros((num_steps, *shape), jnp.float32)
    if step_noise is None:
        if rng is None:
            raise ValueError("DDPM sampling needs step_noise (num_steps, B, horizon, action_dim) or rng")
        return jax.random.normal(rng, (num_steps, *shape))
    step_noise = jnp.asarray(step_noise, jnp.float32)
    if step_noise.shape != (num_steps, *shape):
        raise ValueError(f"step_noise has shape {step_noise.shape}, expected {(num_steps, *shape)} (row i is the "
                         "variance noise of step i; rows of steps at timestep 0 are unused)")
    return step_noise


def conditional_sample(config: DiffusionConfig, params: dict, global_cond: jax.Array, noise: jax.Array, *,
                       step_noise: jax.Array | None = None, rng: jax.Array | None = None,
                       hooks: Hooks = NO_HOOKS) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Denoise ``noise`` (B, horizon, A) over the scheduler's inference timesteps (a ``lax.scan``).

    Returns (full normalised chunk (B, horizon, A), per-step recordings with a leading axis over all steps).
    """
    schedule = schedulers.make_schedule(config)
    num_steps = len(schedule.timesteps)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape[1:] != (config.horizon, config.action_dim):
        raise ValueError(f"noise has shape {noise.shape}, expected (B, {config.horizon}, {config.action_dim})")
    b = noise.shape[0]
    zs = _step_noise(config, step_noise, rng, noise.shape, num_steps)
    unet_p = params["diffusion"]["unet"]

    def step(x, inputs):
        i, t, t_prev, z = inputs
        h = hooks.for_step(i)
        tb = h("diffusion.timestep", jnp.full((b,), t, jnp.int32))
        x = h("diffusion.x_t", x)
        out = unet.unet(config, unet_p, x, tb, global_cond, hook=_prefixed(h, "unet."))
        x0, eps = schedulers.predict_x0(config, schedule, out, t, x)
        x0 = h("diffusion.pred_x0", x0)
        x = schedulers.step_from_x0(config, schedule, x0, eps, t, t_prev, x, z)
        return x, h.collected

    xs = (jnp.arange(num_steps), jnp.asarray(schedule.timesteps, jnp.int32),
          jnp.asarray(schedule.prev_timesteps, jnp.int32), zs)
    sample, per_step = jax.lax.scan(step, noise, xs)
    return sample, per_step


def sample_chunk(config: DiffusionConfig, params: dict, obs: Observation, noise: jax.Array, *,
                 step_noise: jax.Array | None = None, rng: jax.Array | None = None,
                 records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = ()
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Encode the observation once, denoise; returns (full normalised chunk (B, horizon, A), recordings).

    ``noise``: initial sample x_T. ``step_noise`` (num_steps, B, horizon, A) or ``rng``: DDPM variance noise
    (unused by DDIM). Recordings of per-step points keep only the requested steps (leading step axis).
    """
    records, interventions = tuple(records), tuple(interventions)
    num_steps = config.inference_steps
    table = None
    if records or interventions:
        table = hook_table(config)
        table.validate(records, interventions, (), num_steps)
    hooks = Hooks(records=records, interventions=interventions, table=table, num_steps=num_steps)
    global_cond = global_conditioning(config, params, obs, hooks=hooks)
    recorded = dict(hooks.collected)
    sample, per_step = conditional_sample(config, params, global_cond, noise, step_noise=step_noise, rng=rng,
                                          hooks=hooks)
    for name, arr in per_step.items():
        steps = hooks.record_for(name).steps
        recorded[name] = arr[jnp.asarray(resolve_steps(steps, num_steps))]
    return sample, recorded


def action_slice(config: DiffusionConfig) -> slice:
    """The executed part of a chunk: from the current observation step, n_action_steps long."""
    start = config.n_obs_steps - 1
    return slice(start, start + config.n_action_steps)


def sample_actions(config: DiffusionConfig, params: dict, obs: Observation, noise: jax.Array, *,
                   step_noise: jax.Array | None = None, rng: jax.Array | None = None,
                   records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = ()
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LeRobot's ``generate_actions``: (normalised actions (B, n_action_steps, A), recordings)."""
    chunk, recorded = sample_chunk(config, params, obs, noise, step_noise=step_noise, rng=rng, records=records,
                                   interventions=interventions)
    return chunk[:, action_slice(config)], recorded
