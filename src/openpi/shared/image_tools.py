"""Client-side image resizing that matches openpi's preprocessing, plus the same geometry for label masks.

Why: the policy sees each camera image resized to 224x224 *keeping aspect ratio* (PIL bilinear) and zero-padded
centred. Analyses that compare attention with object masks need the masks to go through exactly the same
geometry (same scale, same padding offsets) but with nearest-neighbour sampling, so that labels stay labels.

Both paths share :func:`pad_geometry`, so an image and its mask can never disagree about where the content sits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

Method = Literal["bilinear", "nearest"]
_PIL_METHOD = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class PadGeometry:
    """Where a (src_h, src_w) image lands inside the (height, width) output."""

    resized_h: int
    resized_w: int
    pad_top: int
    pad_left: int


def pad_geometry(src_h: int, src_w: int, height: int, width: int) -> PadGeometry:
    """Scale so the image fits (one side touches the border), then centre it; offsets round down."""
    if min(src_h, src_w, height, width) <= 0:
        raise ValueError(f"image sizes must be positive, got source {src_h}x{src_w} -> target {height}x{width}")
    if (src_h, src_w) == (height, width):
        return PadGeometry(height, width, 0, 0)
    ratio = max(src_w / width, src_h / height)
    resized_h = int(src_h / ratio)
    resized_w = int(src_w / ratio)
    pad_top = max(0, int((height - resized_h) / 2))
    pad_left = max(0, int((width - resized_w) / 2))
    return PadGeometry(resized_h, resized_w, pad_top, pad_left)


def _as_pil_planes(img: np.ndarray, method: Method) -> list[np.ndarray]:
    """Split one HxWxC image into the 2-D/3-D planes PIL resizes (RGB together, labels per channel)."""
    if method == "bilinear":
        return [img] if img.shape[-1] == 3 else [img[..., 0]]
    if img.dtype != np.uint8:  # PIL mode "I" is signed 32-bit
        lo, hi = int(img.min(initial=0)), int(img.max(initial=0))
        if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
            raise ValueError(f"label values must fit in int32 for nearest resize, found range [{lo}, {hi}]")
        img = img.astype(np.int32, copy=False)
    return [img[..., c] for c in range(img.shape[-1])]


def _resize_one(img: np.ndarray, height: int, width: int, method: Method) -> np.ndarray:
    src_h, src_w, channels = img.shape
    geo = pad_geometry(src_h, src_w, height, width)
    resized = []
    for plane in _as_pil_planes(img, method):
        pil = Image.fromarray(np.ascontiguousarray(plane))
        resized.append(np.asarray(pil.resize((geo.resized_w, geo.resized_h), resample=_PIL_METHOD[method])))
    block = resized[0] if resized[0].ndim == 3 else np.stack(resized, axis=-1)
    out = np.zeros((height, width, channels), dtype=img.dtype)
    out[geo.pad_top : geo.pad_top + geo.resized_h, geo.pad_left : geo.pad_left + geo.resized_w] = block
    return out


def resize_with_pad(images: np.ndarray, height: int, width: int, method: Method = "bilinear") -> np.ndarray:
    """Resize ``[..., H, W, C]`` images to ``[..., height, width, C]`` keeping aspect ratio, zero padding centred.

    ``method="bilinear"`` (openpi's client behaviour) needs uint8 input with 1 or 3 channels.
    ``method="nearest"`` takes any integer dtype (label maps) and returns the same dtype, with no new values.
    An input that already has the target size is returned unchanged (as openpi does).
    """
    images = np.asarray(images)
    if images.ndim < 3:
        raise ValueError(f"expected images shaped [..., H, W, C], got shape {images.shape}")
    if method not in _PIL_METHOD:
        raise ValueError(f"unknown resize method {method!r}; expected one of {sorted(_PIL_METHOD)}")
    if method == "bilinear":
        if images.dtype != np.uint8:
            raise ValueError(f"bilinear resize_with_pad expects uint8 images, got dtype {images.dtype}")
        if images.shape[-1] not in (1, 3):
            raise ValueError(f"bilinear resize_with_pad expects 1 or 3 channels, got shape {images.shape}")
    elif not np.issubdtype(images.dtype, np.integer):
        raise ValueError(f"nearest resize_with_pad is for integer label maps, got dtype {images.dtype}")
    if images.shape[-3:-1] == (height, width):
        return images
    lead = images.shape[:-3]
    flat = images.reshape((-1, *images.shape[-3:]))
    out = np.stack([_resize_one(im, height, width, method) for im in flat]) if len(flat) else np.zeros(
        (0, height, width, images.shape[-1]), images.dtype
    )
    return out.reshape((*lead, height, width, images.shape[-1]))


def resize_with_pad_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize integer label maps ``[..., H, W]`` with the same geometry as :func:`resize_with_pad`, nearest sampling."""
    labels = np.asarray(labels)
    if labels.ndim < 2:
        raise ValueError(f"expected label maps shaped [..., H, W], got shape {labels.shape}")
    return resize_with_pad(labels[..., None], height, width, method="nearest")[..., 0]
