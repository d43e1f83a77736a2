"""torchvision ResNet trunk (BasicBlock variants) as LeRobot uses it: ``children()[:-2]``, i.e. no avgpool/fc.

Parameter layout is LeRobot's ``rgb_encoder.backbone`` subtree: ``0`` = conv1 (7x7/2, no bias), ``1`` = the stem
norm, ``4``..``7`` = layer1..layer4, each a list of BasicBlocks with ``conv1``/``bn1``/``conv2``/``bn2`` and, in the
first block of layers 2-4, ``downsample.0`` (1x1/2 conv) + ``downsample.1`` (norm). With ``use_group_norm`` every
BatchNorm is a ``GroupNorm(C // 16, C)`` under the same name (so ``bn1`` holds GroupNorm weights).
"""
from __future__ import annotations

from collections.abc import Callable

import jax

from openpi.models.diffusion import ops
from openpi.models.diffusion.config import BACKBONE_BLOCKS, DiffusionConfig

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
StageHook = Callable[[str, jax.Array], jax.Array]


def stage_widths(config: DiffusionConfig) -> tuple[int, int, int, int]:
    """Channels of layer1..layer4 (the stem has the first): torchvision's (64, 128, 256, 512) at width 64."""
    w = config.backbone_width
    return w, 2 * w, 4 * w, 8 * w


def norm(config: DiffusionConfig, p: dict, x: jax.Array, train: bool) -> jax.Array:
    """The backbone's normalisation layer: GroupNorm(C // 16) when configured, else BatchNorm."""
    if config.use_group_norm:
        return ops.group_norm(p, x, groups=x.shape[1] // 16)
    return ops.batch_norm(p, x, train)


def basic_block(config: DiffusionConfig, p: dict, x: jax.Array, stride: int, train: bool) -> jax.Array:
    out = jax.nn.relu(norm(config, p["bn1"], ops.conv2d(p["conv1"], x, stride, 1), train))
    out = norm(config, p["bn2"], ops.conv2d(p["conv2"], out, 1, 1), train)
    if "downsample" in p:
        x = norm(config, p["downsample"]["1"], ops.conv2d(p["downsample"]["0"], x, stride, 0), train)
    return jax.nn.relu(out + x)


def backbone(config: DiffusionConfig, p: dict, x: jax.Array, train: bool = False,
             on_stage: StageHook | None = None) -> jax.Array:
    """(N, 3, H, W) normalised images -> (N, 8 * backbone_width, h, w) feature map (512 channels in torchvision's).

    ``on_stage(name, x)`` is called after the stem (conv1, norm, relu, maxpool) and after each of layer1..layer4
    with the activation, and its return value is used from there on (the hook points of the encoder).
    """
    hook = on_stage or (lambda _, v: v)
    x = jax.nn.relu(norm(config, p["1"], ops.conv2d(p["0"], x, stride=2, padding=3), train))
    x = hook("stem", ops.max_pool2d(x, 3, 2, 1))
    for i, num_blocks in enumerate(BACKBONE_BLOCKS[config.vision_backbone]):
        layer = p[str(4 + i)]
        for j in range(num_blocks):
            x = basic_block(config, layer[str(j)], x, 2 if (i > 0 and j == 0) else 1, train)
        x = hook(f"layer{i + 1}", x)
    return x


def param_shapes(config: DiffusionConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every state_dict entry of the trunk under ``prefix`` (e.g. ``diffusion.rgb_encoder.backbone``)."""
    out: dict[str, tuple[int, ...]] = {}

    def add_norm(name: str, c: int) -> None:
        out[f"{name}.weight"] = (c,)
        out[f"{name}.bias"] = (c,)
        if not config.use_group_norm:
            out[f"{name}.running_mean"] = (c,)
            out[f"{name}.running_var"] = (c,)
            out[f"{name}.num_batches_tracked"] = ()

    widths = stage_widths(config)
    out[f"{prefix}.0.weight"] = (widths[0], 3, 7, 7)
    add_norm(f"{prefix}.1", widths[0])
    c_in = widths[0]
    for i, num_blocks in enumerate(BACKBONE_BLOCKS[config.vision_backbone]):
        c = widths[i]
        for j in range(num_blocks):
            b = f"{prefix}.{4 + i}.{j}"
            first_in = c_in if j == 0 else c
            out[f"{b}.conv1.weight"] = (c, first_in, 3, 3)
            add_norm(f"{b}.bn1", c)
            out[f"{b}.conv2.weight"] = (c, c, 3, 3)
            add_norm(f"{b}.bn2", c)
            if j == 0 and (i > 0 or c_in != c):
                out[f"{b}.downsample.0.weight"] = (c, c_in, 1, 1)
                add_norm(f"{b}.downsample.1", c)
        c_in = c
    return out
