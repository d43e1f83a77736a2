"""Named policy configs and ``create_policy``: the one place that turns a config name + directory into a Policy.

``pi0_libero`` / ``pi05_libero`` / ``pi0_fast_libero`` need a released checkpoint directory (``params/`` +
``assets/<asset_id>/norm_stats.json``) and PaliGemma's SentencePiece file; ``pi0_fast_libero`` also needs the
FAST action tokenizer folder (openpi's ``physical-intelligence/fast``). ``pi0_fast_tiny`` is the shape of openpi's
tiny Pi0-FAST fixture (seeded random weights unless a checkpoint is given) with a FAST tokenizer fitted on our
scripted demos (``assets/fast_tokenizer_spatial``). ``pi0_tiny_spatial10`` (the default) is a tiny Pi0 trained on
scripted demonstrations of all ten libero_spatial tasks whose checkpoint ships in the package
(``assets/pi0_tiny_spatial10``, card in its ``CARD.md``); ``pi0_tiny_spatial`` is its predecessor (three camera
slots, tasks 0-3). ``pi0_tiny`` / ``pi05_tiny`` are the shapes of openpi's reference fixtures with seeded random weights
(UNTRAINED: their actions are meaningless). All tiny configs use a small tokenizer shipped in the package.
``dp_lerobot`` serves a LeRobot Diffusion Policy folder (``DIFFUSION_CONFIGS``; the network is read from the
folder's config.json; ``openpi.policies.diffusion_policy``, docs/diffusion_policy.md).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

from openpi.models.hooks import AttentionKnockout, HookTable, Intervention, Record, parse_records
from openpi.models import checkpoint
from openpi.models.config import IMAGE_KEYS, AnyModelConfig, Pi0Config, Pi0FASTConfig, tiny_config, tiny_fast_config
from openpi.models.model import Pi0FASTModel, Pi0Model
from openpi.models.normalize import load_norm_stats
from openpi.models.param_shapes import init_params
from openpi.models.tokenizer import EMBEDDED_TOKENIZER, PromptTokenizer
from openpi.models.fast_prompt import FASTPromptFormat
from openpi.models.fast_tokenizer import FASTTokenizer
from openpi.policies.fast_policy import FastLiberoTransforms, FastPolicy
from openpi.policies.libero_policy import LiberoTransforms
from openpi.policies.policy import Policy

logger = logging.getLogger(__name__)
ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
EMBEDDED_CHECKPOINT = ASSETS / "pi0_tiny_spatial10"  # the default config's weights
SPATIAL4_CHECKPOINT = ASSETS / "pi0_tiny_spatial"
LIBERO_ASSET_ID = "physical-intelligence/libero"
TOKENIZER_ENV = "OPENPI_TOKENIZER"
FAST_TOKENIZER_ENV = "OPENPI_FAST_TOKENIZER"
EMBEDDED_FAST_TOKENIZER = ASSETS / "fast_tokenizer_spatial"


def tiny_spatial_config(image_size: int, patch: int, cameras: int = 3) -> Pi0Config:
    """``pi0_tiny_spatial``'s network for ``image_size`` px images cut into ``patch`` px patches (a grid of
    image_size / patch per side). ``cameras=2`` drops the right-wrist slot, which LIBERO never fills: its tokens
    are masked out of attention anyway, so dropping them changes no output but saves their compute."""
    if cameras not in (2, 3):
        raise ValueError(f"cameras must be 2 (agent view, wrist) or 3 (plus the masked right wrist), got {cameras}")
    return tiny_config(max_token_len=32, image_size=image_size, siglip_variant=f"mu/{patch}",
                       image_keys=IMAGE_KEYS[:cameras])


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    name: str
    model: AnyModelConfig
    quantile_norm: bool
    delta_actions: bool
    needs_checkpoint: bool
    asset_id: str = LIBERO_ASSET_ID
    default_checkpoint: pathlib.Path | None = None  # loaded when no checkpoint directory is given
    default_fast_tokenizer: pathlib.Path | None = None  # Pi0-FAST: used when none is given

    @property
    def is_fast(self) -> bool:
        return isinstance(self.model, Pi0FASTConfig)


CONFIGS: dict[str, PolicyConfig] = {c.name: c for c in [
    PolicyConfig("pi0_libero", Pi0Config(action_horizon=50, max_token_len=48), quantile_norm=False,
                 delta_actions=True, needs_checkpoint=True),
    PolicyConfig("pi05_libero", Pi0Config(pi05=True, action_horizon=10, max_token_len=200),
                 quantile_norm=True, delta_actions=False, needs_checkpoint=True),
    PolicyConfig("pi0_tiny", tiny_config(max_token_len=48), quantile_norm=False, delta_actions=False,
                 needs_checkpoint=False),
    PolicyConfig("pi05_tiny", tiny_config(pi05=True, max_token_len=64), quantile_norm=True, delta_actions=False,
                 needs_checkpoint=False),
    # Trained on CPU (docs/training.md): 96 px images in 12 px patches (8x8 tokens per camera) keep the prefix at
    # 224 tokens; libero_spatial prompts are at most 28 tokens with the embedded tokenizer.
    PolicyConfig("pi0_tiny_spatial", tiny_spatial_config(96, 12), quantile_norm=False, delta_actions=False,
                 needs_checkpoint=False, default_checkpoint=SPATIAL4_CHECKPOINT),
    # The same network without the always-masked right-wrist slot, trained with augmentation on 139 scripted demos of
    # all ten libero_spatial tasks (card: assets/pi0_tiny_spatial10/CARD.md, 34/100 held-out successes).
    PolicyConfig("pi0_tiny_spatial10", tiny_spatial_config(96, 12, cameras=2), quantile_norm=False,
                 delta_actions=False, needs_checkpoint=False, default_checkpoint=EMBEDDED_CHECKPOINT),
    # The same network at other grids, for training a successor (docs/training.md, "Image resolution"): a grid of
    # 12x12 per camera puts the bowl on ~2 patches instead of ~1; without the always-masked right-wrist slot.
    *[PolicyConfig(f"pi0_tiny_spatial_{size}p{patch}_2cam", tiny_spatial_config(size, patch, cameras=2),
                   quantile_norm=False, delta_actions=False, needs_checkpoint=False)
      for size, patch in ((96, 12), (96, 8), (128, 8))],
    # openpi's pi0_fast_libero: action_dim 7, horizon 10, 180 prompt tokens, quantile norm, deltas for the first 6
    # dims (extra_delta_transform), openpi's default of 256 decoding steps.
    PolicyConfig("pi0_fast_libero", Pi0FASTConfig(action_dim=7, action_horizon=10, max_token_len=180),
                 quantile_norm=True, delta_actions=True, needs_checkpoint=True),
    # The tiny fixture's parameter shapes; 64 prompt tokens (LIBERO prompts + 8 state bins take up to ~50 with the
    # embedded text tokenizer, more than the fixture's 48) and 64 decoding steps (chunks take 15 FAST tokens on
    # average, at most 50, plus 6 for "Action: ", "|" and the end of sequence).
    PolicyConfig("pi0_fast_tiny", tiny_fast_config(max_token_len=64, max_decoding_steps=64), quantile_norm=True,
                 delta_actions=True, needs_checkpoint=False, default_fast_tokenizer=EMBEDDED_FAST_TOKENIZER),
    # For training a tiny Pi0-FAST on our demos on CPU (docs/training.md): pi0_tiny_spatial's image grid (96 px in
    # 12 px patches, agent view + wrist) and room for the prompt plus a chunk's FAST tokens in training.
    PolicyConfig("pi0_fast_tiny_spatial", tiny_fast_config(image_size=96, siglip_variant="mu/12",
                                                           image_keys=IMAGE_KEYS[:2], max_token_len=112,
                                                           max_decoding_steps=64),
                 quantile_norm=True, delta_actions=True, needs_checkpoint=False,
                 default_checkpoint=ASSETS / "pi0_fast_tiny_spatial", default_fast_tokenizer=EMBEDDED_FAST_TOKENIZER),
]}
DEFAULT_CONFIG = "pi0_tiny_spatial10"
# LeRobot Diffusion Policy configs: the network comes from the folder's config.json, so these name only the family
# (openpi.policies.diffusion_policy); they have no PolicyConfig.
DIFFUSION_CONFIGS: dict[str, str] = {
    "dp_lerobot": "LeRobot Diffusion Policy folder (config.json + model.safetensors + processors) taking LIBERO's "
                  "agent view, wrist camera and 8-D state; needs --policy.dir",
    "dp_tiny_spatial10": "the tiny Diffusion Policy trained here on the same demos as pi0_tiny_spatial10 "
                         "(assets/dp_tiny_spatial10, CARD.md; --policy.dir overrides)",
}
# Folders served when a Diffusion Policy config is given without --policy.dir.
DIFFUSION_DEFAULT_DIRS: dict[str, pathlib.Path] = {"dp_tiny_spatial10": ASSETS / "dp_tiny_spatial10"}


def available_configs() -> list[str]:
    return sorted([*CONFIGS, *DIFFUSION_CONFIGS])


def get_config(name: str) -> PolicyConfig:
    if name in DIFFUSION_CONFIGS:
        raise ValueError(f"{name!r} is a Diffusion Policy config, read from its LeRobot folder's config.json: it has "
                         "no Pi0-family PolicyConfig (build it with create_policy)")
    if name not in CONFIGS:
        raise ValueError(f"unknown policy config {name!r}; available: {available_configs()}")
    return CONFIGS[name]


def find_tokenizer(checkpoint_dir: pathlib.Path | None, tokenizer: str | None) -> pathlib.Path:
    """PaliGemma tokenizer: explicit path, then $OPENPI_TOKENIZER, then inside the checkpoint directory."""
    candidates = [tokenizer, os.environ.get(TOKENIZER_ENV)]
    if checkpoint_dir is not None:
        candidates += [checkpoint_dir / "paligemma_tokenizer.model", checkpoint_dir / "assets" / "paligemma_tokenizer.model"]
    for c in candidates:
        if c and pathlib.Path(c).is_file():
            return pathlib.Path(c)
    raise FileNotFoundError(
        "PaliGemma tokenizer (paligemma_tokenizer.model) not found: pass --policy.tokenizer PATH, set "
        f"${TOKENIZER_ENV}, or put it in the checkpoint directory (looked in: {[str(c) for c in candidates if c]})")


def find_fast_tokenizer(cfg: PolicyConfig, checkpoint_dir: pathlib.Path | None, fast_tokenizer: str | None
                        ) -> pathlib.Path:
    """FAST tokenizer folder: explicit path, then $OPENPI_FAST_TOKENIZER, then <checkpoint>/fast_tokenizer, then
    the config's embedded one."""
    candidates = [fast_tokenizer, os.environ.get(FAST_TOKENIZER_ENV)]
    if checkpoint_dir is not None:
        candidates += [checkpoint_dir / "fast_tokenizer", checkpoint_dir / "assets" / "fast_tokenizer"]
    candidates.append(cfg.default_fast_tokenizer)
    for c in candidates:
        if c and (pathlib.Path(c) / "tokenizer.json").is_file():
            return pathlib.Path(c)
    raise FileNotFoundError(
        f"config {cfg.name!r} needs a FAST action tokenizer folder (tokenizer.json + processor_config.json, e.g. "
        f"openpi's physical-intelligence/fast): pass fast_tokenizer=PATH (--policy.fast-tokenizer), set "
        f"${FAST_TOKENIZER_ENV}, or put it in <checkpoint>/fast_tokenizer (looked in: "
        f"{[str(c) for c in candidates if c]})")


def make_transforms(cfg: PolicyConfig, model_cfg: AnyModelConfig, tokenizer_path: pathlib.Path,
                    norm_stats: dict | None, fast_tokenizer_dir: pathlib.Path | None = None,
                    default_prompt: str | None = None) -> LiberoTransforms:
    """The request -> model-input glue of a config (serving and training build it here, so they agree)."""
    if cfg.is_fast:
        if fast_tokenizer_dir is None:
            raise ValueError(f"config {cfg.name!r} is Pi0-FAST: a FAST tokenizer folder is needed")
        prompt_format = FASTPromptFormat.from_sentencepiece(tokenizer_path, FASTTokenizer.load(fast_tokenizer_dir),
                                                            vocab_size=model_cfg.vocab_size,
                                                            max_len=model_cfg.max_token_len)
        return FastLiberoTransforms(model_cfg, prompt_format, norm_stats, quantile_norm=cfg.quantile_norm,
                                    delta_actions=cfg.delta_actions, default_prompt=default_prompt)
    return LiberoTransforms(model_cfg, PromptTokenizer(tokenizer_path, model_cfg.max_token_len), norm_stats,
                            quantile_norm=cfg.quantile_norm, delta_actions=cfg.delta_actions,
                            default_prompt=default_prompt)


def card_summary(path: pathlib.Path) -> str:
    """The first paragraph after the title of a checkpoint's CARD.md: what the policy is and how well it does."""
    paragraphs = [p.strip() for p in path.read_text().split("\n\n")]
    text = next((p for p in paragraphs if p and not p.startswith("#")), "")
    return " ".join(text.split())


def _check_requests(table: HookTable, records: tuple[Record, ...], interventions: tuple[Intervention, ...],
                    knockouts: tuple[AttentionKnockout, ...], num_steps: int, record_dir: str | None) -> None:
    """Requests against the family's hook table, before a store opens: a site that matches nothing is an error
    naming the nearest valid names, never an empty store."""
    table.validate(records, interventions, knockouts, num_steps)
    if record_dir is not None and not records:
        raise ValueError("record_dir given but no sites to record (pass --record SITE ...)")


def _store_recorder(record_dir: str | None, writer_id: str | None, model_config: dict, records: tuple[Record, ...],
                    table: HookTable, num_steps: int, site_extras: dict[str, dict] | None = None):
    """The recorder writing every inference's recordings to ``record_dir`` (None without one)."""
    if record_dir is None:
        return None
    from openpi.interp.recorder import StoreRecorder
    from openpi.interp.store import StoreWriter
    writer = StoreWriter(record_dir, model_config, writer_id=writer_id, shard_rows=4096)
    return StoreRecorder(writer, records, table, num_steps, site_extras=site_extras)


def create_policy(config_name: str = DEFAULT_CONFIG, checkpoint_dir: str | None = None, *,
                  default_prompt: str | None = None, tokenizer: str | None = None,
                  record_sites: tuple[str, ...] | list[str] | None = (), record_dir: str | None = None,
                  writer_id: str | None = None, interventions: tuple[Intervention, ...] = (),
                  knockouts: tuple[AttentionKnockout, ...] = (), num_steps: int | None = None, seed: int = 0,
                  dtype: str | None = None, random_weights: bool = False, fast_tokenizer: str | None = None,
                  temperature: float = 0.0, coefficient_count: str = "openpi", compact_prefix: bool = False) -> Policy:
    """Build a Policy from a named config; with ``record_dir`` every inference's recordings go to a store.

    Weights: ``checkpoint_dir``, else the config's embedded checkpoint, else (or with ``random_weights``, the
    untrained baseline of the same architecture) seeded random weights. ``num_steps``: flow-matching denoising
    steps (default 10) or, for Pi0-FAST, decoding steps (default the config's ``max_decoding_steps``);
    ``fast_tokenizer`` / ``temperature`` / ``coefficient_count`` (``"openpi"``: a generated chunk with the wrong
    number of DCT coefficients decodes to zeros, flagged; ``"fit"``: fitted, flagged): Pi0-FAST only.
    ``compact_prefix`` (Pi0/Pi0.5): drop masked cameras and prompt padding that no recording or edit selects before
    the transformer (same actions within float rounding, recordings in the full layout, see ``Pi0Model``). ``dp_lerobot`` takes only
    ``checkpoint_dir`` (the LeRobot folder), ``num_steps``, ``seed``, recording and interventions (see
    ``create_diffusion_policy``); its prompt is unused, so ``default_prompt`` has no effect.
    """
    if config_name in DIFFUSION_CONFIGS:
        pi0_only = {"tokenizer": tokenizer is not None, "dtype": dtype is not None,
                    "fast_tokenizer": fast_tokenizer is not None, "temperature": bool(temperature),
                    "knockouts": bool(knockouts), "compact_prefix": compact_prefix,
                    "coefficient_count": coefficient_count != "openpi", "random_weights": random_weights}
        given = sorted(k for k, v in pi0_only.items() if v)
        if given:
            raise ValueError(f"{given} do not apply to {config_name!r} (a LeRobot Diffusion Policy); drop them")
        return create_diffusion_policy(config_name, checkpoint_dir, record_sites=record_sites, record_dir=record_dir,
                                       writer_id=writer_id, interventions=interventions, num_steps=num_steps,
                                       seed=seed)
    cfg = get_config(config_name)
    model_cfg = cfg.model if dtype is None else dataclasses.replace(cfg.model, dtype=dtype)
    if not cfg.is_fast and (fast_tokenizer is not None or temperature or coefficient_count != "openpi"):
        raise ValueError(f"fast_tokenizer, temperature and coefficient_count are Pi0-FAST options; {config_name!r} "
                         f"is a {model_cfg.model_type} config")
    if num_steps is None:
        num_steps = model_cfg.max_decoding_steps if cfg.is_fast else 10
    records = parse_records(record_sites or ())
    if compact_prefix and cfg.is_fast:
        raise ValueError(f"compact_prefix is a Pi0/Pi0.5 option; {config_name!r} is a Pi0-FAST config")
    # Requests are checked before any weights are loaded (_check_requests).
    table = (FastPolicy if cfg.is_fast else Policy).hook_table_for(model_cfg, num_steps)
    _check_requests(table, records, interventions, knockouts, num_steps, record_dir)
    if random_weights and checkpoint_dir:
        raise ValueError("pass either checkpoint_dir or random_weights, not both")
    ckpt = pathlib.Path(checkpoint_dir).expanduser() if checkpoint_dir else None
    if ckpt is None and not random_weights and cfg.default_checkpoint is not None:
        ckpt = cfg.default_checkpoint
        if not (ckpt / "params").exists():
            raise FileNotFoundError(f"config {config_name!r}: its embedded checkpoint {ckpt} is missing (a broken "
                                    "install?); pass a checkpoint directory or random_weights=True")
    if cfg.needs_checkpoint:
        if ckpt is None:
            raise ValueError(f"config {config_name!r} needs --policy.dir pointing at an openpi checkpoint directory")
        params = checkpoint.load_params(ckpt, model_cfg)
        norm_stats = load_norm_stats(ckpt / "assets" / cfg.asset_id / "norm_stats.json")
        tok_path = find_tokenizer(ckpt, tokenizer)
        trained = True
    elif ckpt is not None:
        params = checkpoint.load_params(ckpt, model_cfg)
        stats_path = ckpt / "assets" / cfg.asset_id / "norm_stats.json"
        norm_stats = load_norm_stats(stats_path) if stats_path.exists() else None
        tok_path = pathlib.Path(tokenizer) if tokenizer else EMBEDDED_TOKENIZER
        trained = True
    else:
        params, norm_stats, trained = init_params(model_cfg, seed=seed), None, False
        tok_path = pathlib.Path(tokenizer) if tokenizer else EMBEDDED_TOKENIZER
        logger.warning("serving %s with seeded RANDOM weights (untrained): actions are meaningless", config_name)
    fast_dir = find_fast_tokenizer(cfg, ckpt, fast_tokenizer) if cfg.is_fast else None
    transforms = make_transforms(cfg, model_cfg, tok_path, norm_stats, fast_dir, default_prompt)
    recorder = _store_recorder(record_dir, writer_id, {"name": config_name, **model_cfg.to_dict()}, records, table,
                               num_steps)
    metadata = {"config": config_name, "model": model_cfg.model_type, "trained": trained,
                "action_horizon": model_cfg.action_horizon, "checkpoint": str(ckpt) if ckpt else None,
                "recording": [f"{r.site}" for r in records], "compact_prefix": compact_prefix}
    if cfg.is_fast:
        metadata.update(fast_tokenizer=str(fast_dir), temperature=temperature, max_decoding_steps=num_steps,
                        coefficient_count=coefficient_count)
    if not trained:
        metadata["warning"] = "untrained: seeded random weights, actions are meaningless"
    elif ckpt is not None and (ckpt / "CARD.md").is_file():
        metadata["card"] = card_summary(ckpt / "CARD.md")
    common = dict(metadata=metadata, records=records, interventions=interventions, knockouts=knockouts,
                  recorder=recorder, num_steps=num_steps, seed=seed)
    if cfg.is_fast:
        return FastPolicy(Pi0FASTModel(model_cfg, params), transforms, temperature=temperature,
                          coefficient_count=coefficient_count, **common)
    return Policy(Pi0Model(model_cfg, params, compact_prefix=compact_prefix), transforms, **common)


def create_diffusion_policy(config_name: str, checkpoint_dir: str | None, *,
                            record_sites: tuple[str, ...] | list[str] | None = (), record_dir: str | None = None,
                            writer_id: str | None = None, interventions: tuple[Intervention, ...] = (),
                            num_steps: int | None = None, seed: int = 0) -> Policy:
    """A LeRobot Diffusion Policy folder served for LIBERO (``openpi.policies.diffusion_policy``); ``num_steps``
    overrides its ``num_inference_steps``, ``seed`` keys the sampling noise. Requests are checked against its hook
    table before the store is opened."""
    from openpi.policies import diffusion_policy as dpp

    checkpoint_dir = checkpoint_dir or DIFFUSION_DEFAULT_DIRS.get(config_name)
    if not checkpoint_dir:
        raise ValueError(f"config {config_name!r} needs --policy.dir pointing at a LeRobot Diffusion Policy folder "
                         "(config.json, model.safetensors, policy_preprocessor.json, policy_postprocessor.json)")
    model = dpp.load_libero_model(checkpoint_dir, num_steps)
    records = parse_records(record_sites or ())
    table = dpp.DiffusionPolicy.hook_table_for(model.config, model.config.inference_steps)
    _check_requests(table, records, interventions, (), model.config.inference_steps, record_dir)
    recorder = _store_recorder(record_dir, writer_id, {"name": config_name, **dpp.dp_config_dict(model.config)},
                               records, table, model.config.inference_steps, dpp.dp_site_info(model.config))
    cfg = model.config
    metadata = {"config": config_name, "model": "diffusion", "trained": True, "action_horizon": cfg.n_action_steps,
                "checkpoint": str(pathlib.Path(checkpoint_dir).expanduser()),
                "recording": [r.site for r in records], "n_obs_steps": cfg.n_obs_steps,
                "num_inference_steps": cfg.inference_steps, "noise_scheduler_type": cfg.noise_scheduler_type,
                "obs_history": "server-side per episode: the last n_obs_steps queried frames (one per request)"}
    transforms = dpp.DiffusionLiberoTransforms(cfg, normalizer=model.normalizer)
    return dpp.DiffusionPolicy(model, transforms, metadata=metadata, records=records, interventions=interventions,
                               recorder=recorder, seed=seed)


__all__ = ["CONFIGS", "DIFFUSION_CONFIGS", "available_configs", "create_diffusion_policy", "create_policy",
           "get_config", "parse_records"]
