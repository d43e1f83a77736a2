"""LeRobot Diffusion Policy ``config.json`` parsed into a frozen dataclass.

Why strict: a LeRobot checkpoint is only usable here if every option that changes the numbers is one we implement.
Unknown keys and unsupported values are errors that name the file, the key, what was found and what is accepted,
rather than a silently different policy. Options that only matter to LeRobot's training loop or hub upload are
listed in ``IGNORED_KEYS`` and skipped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

NORM_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")
FEATURE_TYPES = ("STATE", "VISUAL", "ENV", "ACTION", "REWARD", "LANGUAGE")
BACKBONE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}  # BasicBlock ResNets only
BETA_SCHEDULES = {"DDPM": ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
                  "DDIM": ("linear", "scaled_linear", "squaredcos_cap_v2")}
FINAL_GROUPS = 8  # LeRobot builds the UNet's final conv block without passing n_groups: always 8 groups
OBS_STATE, OBS_ENV_STATE, ACTION = "observation.state", "observation.environment_state", "action"

# Keys with no effect on the forward pass, the loss or sampling (training loop, hub, devices, compilation).
IGNORED_KEYS = frozenset({
    "type", "device", "use_amp", "use_peft", "push_to_hub", "repo_id", "private", "tags", "license",
    "pretrained_path", "pretrained_revision", "drop_n_last_frames", "pretrained_backbone_weights",
    "gradient_checkpointing", "compile_model", "compile_mode", "optimizer_lr", "optimizer_betas",
    "optimizer_eps", "optimizer_weight_decay", "scheduler_name", "scheduler_warmup_steps",
})


class ConfigError(ValueError):
    """A LeRobot config that is malformed or uses an option this implementation does not support."""


@dataclasses.dataclass(frozen=True)
class Feature:
    type: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The options of LeRobot's ``DiffusionConfig`` that change the computation (names and defaults as LeRobot's).

    ``input_features`` / ``output_features`` keep the file's order: camera order in the conditioning vector is the
    order of the VISUAL features.
    """

    input_features: tuple[tuple[str, Feature], ...]
    output_features: tuple[tuple[str, Feature], ...]
    n_obs_steps: int = 2
    horizon: int = 64
    n_action_steps: int = 32
    normalization_mapping: tuple[tuple[str, str], ...] = (("VISUAL", "MEAN_STD"), ("STATE", "MIN_MAX"),
                                                          ("ACTION", "MIN_MAX"))
    vision_backbone: str = "resnet18"
    # Not a LeRobot option: the ResNet's first-stage width (stages are w, 2w, 4w, 8w). torchvision's is 64; a
    # narrower trunk makes a CPU-trainable policy (dp_tiny_spatial10), but LeRobot cannot load such a folder.
    backbone_width: int = 64
    crop_shape: tuple[int, int] | None = None
    crop_is_random: bool = True
    use_group_norm: bool = False
    spatial_softmax_num_keypoints: int = 32
    use_separate_rgb_encoder_per_camera: bool = True
    down_dims: tuple[int, ...] = (512, 1024, 2048)
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    use_film_scale_modulation: bool = True
    noise_scheduler_type: str = "DDPM"
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    num_inference_steps: int | None = None
    do_mask_loss_for_padding: bool = False
    source: str = "<config>"  # where it was read from, for error messages

    def __post_init__(self) -> None:
        validate(self)

    # ---------------------------------------------------------------------------------------------- derived sizes

    @property
    def image_keys(self) -> tuple[str, ...]:
        """VISUAL input features in file order (= camera order everywhere in the model)."""
        return tuple(k for k, f in self.input_features if f.type == "VISUAL")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return dict(self.input_features)[self.image_keys[0]].shape

    @property
    def state_dim(self) -> int:
        return dict(self.input_features)[OBS_STATE].shape[0]

    @property
    def env_state_dim(self) -> int:
        """0 without an ENV feature (LeRobot reads it from ``observation.environment_state``)."""
        env = [f for _, f in self.input_features if f.type == "ENV"]
        return env[0].shape[0] if env else 0

    @property
    def action_dim(self) -> int:
        return dict(self.output_features)[ACTION].shape[0]

    @property
    def num_cameras(self) -> int:
        return len(self.image_keys)

    @property
    def encoder_input_hw(self) -> tuple[int, int]:
        """Image height/width entering the backbone (after the crop, if any)."""
        return self.crop_shape if self.crop_shape is not None else tuple(self.image_shape[1:])

    @property
    def feature_map_hw(self) -> tuple[int, int]:
        """Backbone output height/width: conv1 (7x7/2, pad 3), maxpool (3/2, pad 1), then three stride-2 stages."""
        def down(n: int, k: int, s: int, p: int) -> int:
            return (n + 2 * p - k) // s + 1
        hw = []
        for n in self.encoder_input_hw:
            n = down(down(n, 7, 2, 3), 3, 2, 1)
            for _ in range(3):
                n = down(n, 3, 2, 1)
            hw.append(n)
        return tuple(hw)

    @property
    def image_feature_dim(self) -> int:
        return 2 * self.spatial_softmax_num_keypoints

    @property
    def obs_cond_dim(self) -> int:
        """Conditioning width of one observation step: state, each camera's features, env state."""
        return self.state_dim + self.num_cameras * self.image_feature_dim + self.env_state_dim

    @property
    def global_cond_dim(self) -> int:
        return self.obs_cond_dim * self.n_obs_steps

    @property
    def film_cond_dim(self) -> int:
        return self.diffusion_step_embed_dim + self.global_cond_dim

    @property
    def inference_steps(self) -> int:
        return self.num_train_timesteps if self.num_inference_steps is None else self.num_inference_steps

    def norm_mode(self, feature_type: str) -> str:
        return dict(self.normalization_mapping).get(feature_type, "IDENTITY")

    def replace(self, **changes: Any) -> DiffusionConfig:
        return dataclasses.replace(self, **changes)


def _fail(cfg: DiffusionConfig, key: str, found: Any, accepted: str) -> None:
    raise ConfigError(f"{cfg.source}: unsupported {key}={found!r}; {accepted}")


def validate(cfg: DiffusionConfig) -> None:
    """LeRobot's own checks plus the limits of this implementation."""
    inputs = dict(cfg.input_features)
    for name, feat in (*cfg.input_features, *cfg.output_features):
        if feat.type not in FEATURE_TYPES:
            _fail(cfg, f"feature {name!r} type", feat.type, f"expected one of {FEATURE_TYPES}")
    if OBS_STATE not in inputs or inputs[OBS_STATE].type != "STATE":
        raise ConfigError(f"{cfg.source}: input_features needs {OBS_STATE!r} of type STATE (LeRobot requires it); "
                          f"found {sorted(inputs)}")
    envs = [k for k, f in cfg.input_features if f.type == "ENV"]
    if envs and envs != [OBS_ENV_STATE]:
        _fail(cfg, "ENV input features", envs, f"LeRobot reads the environment state only from {OBS_ENV_STATE!r}")
    others = [k for k, f in cfg.input_features if f.type not in ("STATE", "VISUAL", "ENV") or
              (f.type == "STATE" and k != OBS_STATE)]
    if others:
        _fail(cfg, "input_features", others, "Diffusion Policy uses only observation.state, VISUAL and ENV inputs")
    if not cfg.image_keys and not envs:
        raise ConfigError(f"{cfg.source}: needs at least one VISUAL input or {OBS_ENV_STATE!r}")
    outputs = dict(cfg.output_features)
    if ACTION not in outputs or outputs[ACTION].type != "ACTION" or len(outputs[ACTION].shape) != 1:
        raise ConfigError(f"{cfg.source}: output_features needs 'action' of type ACTION with a 1-D shape; "
                          f"found {dict(cfg.output_features)}")
    shapes = {inputs[k].shape for k in cfg.image_keys}
    if len(shapes) > 1:
        _fail(cfg, "image shapes", {k: inputs[k].shape for k in cfg.image_keys}, "all cameras must share one shape")
    if cfg.image_keys:
        shape = cfg.image_shape
        if len(shape) != 3 or shape[0] != 3:
            _fail(cfg, "image shape", shape, "expected (3, H, W)")
        if cfg.crop_shape is not None and (cfg.crop_shape[0] > shape[1] or cfg.crop_shape[1] > shape[2]):
            _fail(cfg, "crop_shape", cfg.crop_shape, f"it must fit within the image shape {shape}")
    for ftype, mode in cfg.normalization_mapping:
        if mode not in NORM_MODES:
            _fail(cfg, f"normalization_mapping[{ftype!r}]", mode, f"expected one of {NORM_MODES}")
    if cfg.vision_backbone not in BACKBONE_BLOCKS:
        _fail(cfg, "vision_backbone", cfg.vision_backbone,
              f"supported: {sorted(BACKBONE_BLOCKS)} (BasicBlock ResNets; bottleneck ResNets are not implemented)")
    if cfg.backbone_width < 1 or (cfg.use_group_norm and cfg.backbone_width % 16):
        _fail(cfg, "backbone_width", cfg.backbone_width,
              "expected a positive width (a multiple of 16 with use_group_norm, whose groups are C // 16)")
    if cfg.noise_scheduler_type not in BETA_SCHEDULES:
        _fail(cfg, "noise_scheduler_type", cfg.noise_scheduler_type, "expected 'DDPM' or 'DDIM'")
    if cfg.beta_schedule not in BETA_SCHEDULES[cfg.noise_scheduler_type]:
        _fail(cfg, "beta_schedule", cfg.beta_schedule,
              f"{cfg.noise_scheduler_type} supports {BETA_SCHEDULES[cfg.noise_scheduler_type]}")
    if cfg.prediction_type not in ("epsilon", "sample"):
        _fail(cfg, "prediction_type", cfg.prediction_type, "expected 'epsilon' or 'sample' (as LeRobot)")
    if not cfg.down_dims:
        _fail(cfg, "down_dims", cfg.down_dims, "needs at least one stage")
    if cfg.horizon % (2 ** len(cfg.down_dims)):
        _fail(cfg, "horizon", cfg.horizon, f"it must be a multiple of 2**len(down_dims) = {2 ** len(cfg.down_dims)}")
    if any(c % cfg.n_groups for c in cfg.down_dims):
        _fail(cfg, "down_dims", cfg.down_dims, f"every width must be divisible by n_groups={cfg.n_groups}")
    if cfg.down_dims[0] % FINAL_GROUPS:
        _fail(cfg, "down_dims[0]", cfg.down_dims[0], f"LeRobot's final conv block always uses GroupNorm("
              f"{FINAL_GROUPS}), so it must be divisible by {FINAL_GROUPS}")
    if cfg.diffusion_step_embed_dim % 2 or cfg.diffusion_step_embed_dim < 4:
        _fail(cfg, "diffusion_step_embed_dim", cfg.diffusion_step_embed_dim, "expected an even number >= 4")
    if cfg.kernel_size % 2 == 0:
        _fail(cfg, "kernel_size", cfg.kernel_size, "expected an odd kernel (padding kernel_size // 2 keeps length)")
    if cfg.n_obs_steps < 1:
        _fail(cfg, "n_obs_steps", cfg.n_obs_steps, "expected >= 1")
    if not 1 <= cfg.n_action_steps <= cfg.horizon - cfg.n_obs_steps + 1:
        _fail(cfg, "n_action_steps", cfg.n_action_steps,
              f"need 1 <= n_action_steps <= horizon - n_obs_steps + 1 = {cfg.horizon - cfg.n_obs_steps + 1}")
    if not 1 <= cfg.inference_steps <= cfg.num_train_timesteps:
        _fail(cfg, "num_inference_steps", cfg.num_inference_steps,
              f"expected 1..num_train_timesteps ({cfg.num_train_timesteps})")
    if cfg.image_keys and min(cfg.feature_map_hw) < 1:
        _fail(cfg, "image size", cfg.encoder_input_hw, "too small for the ResNet trunk")


# ------------------------------------------------------------------------------------------------ parsing


def _feature_map(raw: Any, where: str, source: str) -> tuple[tuple[str, Feature], ...]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping of feature name -> {{type, shape}}, found {raw!r}")
    out = []
    for name, spec in raw.items():
        try:
            out.append((str(name), Feature(str(spec["type"]), tuple(int(d) for d in spec["shape"]))))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{source}: {where}[{name!r}] must have 'type' and 'shape', found {spec!r}") from None
    return tuple(out)


def _pair(raw: Any, key: str, source: str) -> tuple[int, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise ConfigError(f"{source}: {key} must be null or [H, W], found {raw!r}")
    return int(raw[0]), int(raw[1])


def from_dict(raw: Mapping[str, Any], source: str = "<config>") -> DiffusionConfig:
    """Build a config from LeRobot's ``config.json`` dict; every key is either used, ignored on purpose, or an
    error."""
    if raw.get("type", "diffusion") != "diffusion":
        raise ConfigError(f"{source}: type={raw.get('type')!r}; this loader reads LeRobot 'diffusion' policies only")
    fields = {f.name for f in dataclasses.fields(DiffusionConfig)} - {"source"}
    # crop_ratio only acts together with resize_shape, which is refused below.
    known = fields | IGNORED_KEYS | {"resize_shape", "crop_ratio"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown config option(s) {unknown}; this implementation does not know what "
                          "they change, so it refuses to guess (known options: see openpi.models.diffusion.config)")
    if raw.get("resize_shape") is not None:
        raise ConfigError(f"{source}: unsupported resize_shape={raw['resize_shape']!r}; torchvision's antialiased "
                          "Resize has no parity-checked equivalent here (resize images before the policy and set "
                          "resize_shape to null)")
    for key in ("input_features", "output_features"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key {key!r}")
    kwargs: dict[str, Any] = {"source": source}
    for name in fields:
        if name not in raw:
            continue
        value = raw[name]
        if name in ("input_features", "output_features"):
            value = _feature_map(value, name, source)
        elif name == "normalization_mapping":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: normalization_mapping must be a mapping, found {value!r}")
            value = tuple((str(k), str(v)) for k, v in value.items())
        elif name == "crop_shape":
            value = _pair(value, name, source)
        elif name == "down_dims":
            value = tuple(int(d) for d in value)
        kwargs[name] = value
    for name in ("beta_start", "beta_end", "clip_sample_range"):
        if name in kwargs and not math.isfinite(float(kwargs[name])):
            raise ConfigError(f"{source}: {name} must be finite, found {kwargs[name]!r}")
    return DiffusionConfig(**kwargs)


def load_config(path: str | pathlib.Path) -> DiffusionConfig:
    """Read ``config.json`` (or a folder holding it)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: LeRobot policy config not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return from_dict(raw, str(path))
