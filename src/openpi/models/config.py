"""Model configurations: SigLIP and Gemma variants, and the Pi0 / Pi0.5 config that ties them together.

Variant tables are the facts that define compatibility with openpi's released checkpoints (tested: every
parameter path and shape of the full-size configs equals openpi's manifests).
"""
from __future__ import annotations

import dataclasses
import re

IMAGE_KEYS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
PALIGEMMA_VOCAB_SIZE = 257_152


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch: int

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


_SIGLIP_VARIANTS = {
    "mu": (32, 1, 128, 2),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "So400m": (1152, 27, 4304, 16),
}


def siglip_config(variant: str) -> SigLIPConfig:
    """Parse a big_vision variant name such as 'So400m/14' (the patch size comes after the slash)."""
    match = re.fullmatch(r"(\w+)/(\d+)", variant)
    if match is None or match.group(1) not in _SIGLIP_VARIANTS:
        raise ValueError(f"unknown SigLIP variant {variant!r}; expected one of "
                         f"{[v + '/14' for v in _SIGLIP_VARIANTS]} (name/patch)")
    width, depth, mlp_dim, heads = _SIGLIP_VARIANTS[match.group(1)]
    return SigLIPConfig(width, depth, mlp_dim, heads, int(match.group(2)))


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


_GEMMA_VARIANTS = {
    "dummy": GemmaConfig(64, 4, 128, 8, 1, 16),
    "gemma_300m": GemmaConfig(1024, 18, 4096, 8, 1, 256),
    "gemma_2b": GemmaConfig(2048, 18, 16384, 8, 1, 256),
}


def gemma_config(variant: str) -> GemmaConfig:
    if variant not in _GEMMA_VARIANTS:
        raise ValueError(f"unknown Gemma variant {variant!r}; expected one of {sorted(_GEMMA_VARIANTS)}")
    return _GEMMA_VARIANTS[variant]


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    """Pi0 (pi05=False) or Pi0.5 (pi05=True). Defaults are openpi's full-size Pi0 defaults."""

    pi05: bool = False
    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    siglip_variant: str = "So400m/14"
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    dtype: str = "bfloat16"
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 48
    image_size: int = 224
    image_keys: tuple[str, ...] = IMAGE_KEYS
    # Pi0.5 feeds the discretised state through the prompt ("Task: ..., State: ...;\nAction: ").
    discrete_state_input: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        siglip = self.siglip
        if self.image_size % siglip.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {siglip.patch}")
        if self.llm.num_heads != self.expert.num_heads or self.llm.head_dim != self.expert.head_dim \
                or self.llm.depth != self.expert.depth or self.llm.num_kv_heads != self.expert.num_kv_heads:
            raise ValueError("both Gemma experts must share depth, heads and head_dim (they share one attention)")

    @property
    def siglip(self) -> SigLIPConfig:
        return siglip_config(self.siglip_variant)

    @property
    def llm(self) -> GemmaConfig:
        return gemma_config(self.paligemma_variant)

    @property
    def expert(self) -> GemmaConfig:
        return gemma_config(self.action_expert_variant)

    @property
    def grid(self) -> int:
        """Patches per image side (16 for 224/14)."""
        return self.image_size // self.siglip.patch

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def prefix_len(self) -> int:
        return len(self.image_keys) * self.tokens_per_image + self.max_token_len

    @property
    def suffix_len(self) -> int:
        return self.action_horizon + (0 if self.pi05 else 1)

    @property
    def model_type(self) -> str:
        return "pi05" if self.pi05 else "pi0"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_keys"] = list(self.image_keys)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Pi0Config":
        d = dict(d)
        d["image_keys"] = tuple(d.get("image_keys", IMAGE_KEYS))
        return cls(**d)


def tiny_config(pi05: bool = False, **overrides) -> Pi0Config:
    """The configuration of openpi's reference fixtures: SigLIP mu/14, Gemma 'dummy' experts, vocab 1024."""
    kwargs = dict(pi05=pi05, paligemma_variant="dummy", action_expert_variant="dummy", siglip_variant="mu/14",
                  vocab_size=1024, dtype="float32", action_horizon=10, max_token_len=16 if not pi05 else 48,
                  discrete_state_input=pi05)
    kwargs.update(overrides)
    return Pi0Config(**kwargs)


DECODE_ATTENTION_MODES = ("openpi", "valid")
DECODE_POSITION_MODES = ("openpi", "contiguous")
EOS_STOP_MODES = ("openpi", "per_sample")


@dataclasses.dataclass(frozen=True)
class Pi0FASTConfig:
    """Pi0-FAST: PaliGemma (SigLIP + one Gemma) decoding FAST action tokens autoregressively.

    Defaults are openpi's ``Pi0FASTConfig()`` (gemma_2b, action_dim 32, horizon 32, max_token_len 250; openpi's
    ``sample_actions`` default of 256 decoding steps). The three ``decode_*``/``eos_stop`` fields choose between
    reproducing openpi's decoding exactly (``"openpi"``, the default) and the corrected paths (``"valid"``,
    ``"contiguous"``, ``"per_sample"``) explained in the docstring of :mod:`openpi.models.pi0_fast`.
    """

    paligemma_variant: str = "gemma_2b"
    siglip_variant: str = "So400m/14"
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    dtype: str = "bfloat16"
    action_dim: int = 32
    action_horizon: int = 32
    max_token_len: int = 250
    image_size: int = 224
    image_keys: tuple[str, ...] = IMAGE_KEYS
    max_decoding_steps: int = 256
    # FAST ids live at the top of the vocabulary, below its last `fast_skip_tokens` (special) ids.
    fast_skip_tokens: int = 128
    eos_token: int = 1
    decode_attention: str = "openpi"
    decode_positions: str = "openpi"
    eos_stop: str = "openpi"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.image_size % self.siglip.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {self.siglip.patch}")
        self.llm  # noqa: B018 - validates the variant name
        for name, value, allowed in (("decode_attention", self.decode_attention, DECODE_ATTENTION_MODES),
                                     ("decode_positions", self.decode_positions, DECODE_POSITION_MODES),
                                     ("eos_stop", self.eos_stop, EOS_STOP_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.max_decoding_steps < 1:
            raise ValueError(f"max_decoding_steps must be >= 1, got {self.max_decoding_steps}")

    # Sizes and (de)serialisation are the same derivations as Pi0's, over the same field names.
    siglip = Pi0Config.siglip
    llm = Pi0Config.llm
    grid = Pi0Config.grid
    tokens_per_image = Pi0Config.tokens_per_image
    prefix_len = Pi0Config.prefix_len  # image tokens of every camera, then max_token_len prompt tokens
    to_dict = Pi0Config.to_dict
    from_dict = Pi0Config.__dict__["from_dict"]

    @property
    def model_type(self) -> str:
        return "pi0_fast"


def tiny_fast_config(**overrides) -> Pi0FASTConfig:
    """The configuration of openpi's tiny Pi0-FAST fixture (pi0_fast_tiny.npz): SigLIP mu/14, Gemma 'dummy',
    vocab 1024, float32, action_dim 7, horizon 10, 48 prompt tokens, 16 decoding steps."""
    kwargs = dict(paligemma_variant="dummy", siglip_variant="mu/14", vocab_size=1024, dtype="float32", action_dim=7,
                  action_horizon=10, max_token_len=48, max_decoding_steps=16)
    kwargs.update(overrides)
    return Pi0FASTConfig(**kwargs)


AnyModelConfig = Pi0Config | Pi0FASTConfig
