"""Figures and videos of attention for people to look at (never used for metrics).

Why separate from the metrics: upsampling and colour scaling are display choices. Metrics read patch-level
probabilities (openpi.interp.iou); everything here may smooth and rescale. Colour scaling of the overlays: 0 maps
to the bottom of the colormap and ``vmax`` to the top, one scale shared by every camera panel of a figure (by
default the largest patch probability among them), with a colour bar in attention probability per patch, so two
panels can be compared by colour. Object outlines mark the instance masks that were scored.

Figures are drawn on bare ``matplotlib.figure.Figure`` objects (no pyplot), so importing this module never
changes the caller's matplotlib backend, and every PNG is written atomically.
"""
from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from openpi.shared.io import atomic_path

DPI = 100
SPAN_COLOURS = {"instruction": "tab:blue", "template": "tab:gray", "pad": "lightgray"}


def upsample(heatmap: np.ndarray, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """(gh, gw) -> (H, W) float32 for display: bilinear when ``smooth``, else nearest (patch blocks)."""
    img = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32))  # 2-D float32 -> mode "F"
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    return np.asarray(img.resize((size[1], size[0]), resample=resample), dtype=np.float32)


def overlay(frame: np.ndarray, heatmap: np.ndarray, cmap: str = "jet", alpha: float = 0.5,
            vmax: float | None = None, smooth: bool = True) -> np.ndarray:
    """Blend a coloured, upsampled heatmap onto an (H, W, 3) uint8 frame; returns uint8 (H, W, 3)."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame must be (H, W, 3), found {frame.shape}")
    up = upsample(heatmap, frame.shape[:2], smooth)
    top = float(vmax) if vmax is not None else float(up.max())
    norm = np.clip(up / top, 0.0, 1.0) if top > 0 else np.zeros_like(up)
    colour = matplotlib.colormaps[cmap](norm)[..., :3] * 255.0
    out = (1.0 - alpha) * frame.astype(np.float32) + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def side_by_side(images: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate uint8 images horizontally (heights must match)."""
    heights = {im.shape[0] for im in images}
    if len(heights) != 1:
        raise ValueError(f"images of different heights {sorted(heights)} cannot be placed side by side")
    return np.concatenate(list(images), axis=1)


def _save(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path


def _token_label(tok: str) -> str:
    return tok.replace("\n", "\\n").replace("\u2581", " ").strip() or repr(tok)


def shared_vmax(heatmaps: Mapping[str, np.ndarray]) -> float:
    """The top of the shared colour scale: the largest patch probability among the panels (1 if all are 0)."""
    top = max((float(np.max(h)) for h in heatmaps.values() if np.size(h)), default=0.0)
    return top if top > 0 else 1.0


def _draw_overlays(fig: Figure, axes: Sequence, frames: Mapping[str, np.ndarray], heatmaps: Mapping[str, np.ndarray],
                   shares: Mapping[str, float] | None, cmap: str, alpha: float, vmax: float | None,
                   outlines: Mapping[str, np.ndarray] | None) -> None:
    """One overlay per camera on one colour scale with its colour bar; outlines (frame-sized boolean masks) are
    drawn as white contours."""
    top = shared_vmax(heatmaps) if vmax is None else float(vmax)
    for ax, cam in zip(axes, heatmaps):
        ax.imshow(overlay(frames[cam], heatmaps[cam], cmap, alpha, vmax=top))
        label = cam if shares is None or cam not in shares else f"{cam}  (mass {shares[cam]:.3f})"
        outline = None if outlines is None else outlines.get(cam)
        if outline is not None and np.any(outline):
            ax.contour(np.asarray(outline, np.float32), levels=[0.5], colors="white", linewidths=1.2)
            label += "\nwhite outline: scored objects"
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(Normalize(0.0, top), cmap=cmap), ax=list(axes), fraction=0.035, pad=0.02,
                 label="attention probability per patch")


def plot_camera_overlays(frames: Mapping[str, np.ndarray], heatmaps: Mapping[str, np.ndarray],
                         path: str | os.PathLike, title: str | None = None,
                         shares: Mapping[str, float] | None = None, cmap: str = "jet",
                         alpha: float = 0.5, vmax: float | None = None,
                         outlines: Mapping[str, np.ndarray] | None = None) -> pathlib.Path:
    """One panel per camera in ``heatmaps`` (frames keyed by the same names) on one shared colour scale with a
    colour bar, scored objects outlined; size (4 * cams) x 4.4 inches."""
    missing = [c for c in heatmaps if c not in frames]
    if missing:
        raise KeyError(f"no frame for camera(s) {missing}; frames have {list(frames)}")
    fig = Figure(figsize=(4 * len(heatmaps), 4.4))
    axes = fig.subplots(1, len(heatmaps), squeeze=False)[0]
    _draw_overlays(fig, axes, frames, heatmaps, shares, cmap, alpha, vmax, outlines)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _draw_token_bars(ax, weights: np.ndarray, tokens: Sequence[str], kinds: Sequence[str] | None) -> None:
    x = np.arange(len(tokens))
    colours = [SPAN_COLOURS.get(k, "tab:blue") for k in kinds] if kinds is not None else "tab:blue"
    ax.bar(x, weights, color=colours)
    ax.set_xticks(x, [_token_label(t) for t in tokens], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("attention probability")
    if kinds is not None:
        handles = [Patch(color=SPAN_COLOURS.get(k, "tab:blue"), label=k) for k in dict.fromkeys(kinds)]
        ax.legend(handles=handles, fontsize=7)


def plot_text_attention(weights: np.ndarray, tokens: Sequence[str], path: str | os.PathLike,
                        kinds: Sequence[str] | None = None, title: str | None = None) -> pathlib.Path:
    """Bar chart of per-token attention; ``kinds`` (instruction/template per token) sets bar colours."""
    weights = np.asarray(weights)
    if weights.shape != (len(tokens),):
        raise ValueError(f"{weights.shape[0] if weights.ndim else 0} weights for {len(tokens)} tokens")
    fig = Figure(figsize=(max(6.0, 0.35 * len(tokens) + 2), 4))
    ax = fig.add_subplot()
    _draw_token_bars(ax, weights, tokens, kinds)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_token_heatmap(matrix: np.ndarray, tokens: Sequence[str], path: str | os.PathLike,
                             layer_labels: Sequence[int] | None = None, title: str | None = None) -> pathlib.Path:
    """Layer x token heatmap of attention probabilities (rows = layers, columns = tokens)."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[1] != len(tokens):
        raise ValueError(f"matrix of shape {matrix.shape} does not match {len(tokens)} tokens")
    fig = Figure(figsize=(max(6.0, 0.35 * len(tokens) + 2), max(3.0, 0.25 * matrix.shape[0] + 2)))
    ax = fig.add_subplot()
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(np.arange(len(tokens)), [_token_label(t) for t in tokens], rotation=60, ha="right", fontsize=7)
    labels = list(layer_labels) if layer_labels is not None else list(range(matrix.shape[0]))
    ax.set_yticks(np.arange(matrix.shape[0]), [str(v) for v in labels], fontsize=7)
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="attention probability")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_combined(frames: Mapping[str, np.ndarray], heatmaps: Mapping[str, np.ndarray], weights: np.ndarray,
                  tokens: Sequence[str], fractions: Mapping[str, float], path: str | os.PathLike,
                  kinds: Sequence[str] | None = None, title: str | None = None, cmap: str = "jet",
                  alpha: float = 0.5, vmax: float | None = None,
                  outlines: Mapping[str, np.ndarray] | None = None) -> pathlib.Path:
    """Camera overlays on top (shared colour scale and bar); per-token text attention and the modality fractions
    below. 12 x 8 inches."""
    n_cam = max(1, len(heatmaps))
    fig = Figure(figsize=(12, 8), layout="constrained")
    grid = fig.add_gridspec(2, max(n_cam, 2), height_ratios=[1.2, 1])
    _draw_overlays(fig, [fig.add_subplot(grid[0, i]) for i in range(len(heatmaps))], frames, heatmaps,
                   fractions, cmap, alpha, vmax, outlines)
    ax_text = fig.add_subplot(grid[1, : max(n_cam, 2) - 1])
    _draw_token_bars(ax_text, np.asarray(weights), tokens, kinds)
    ax_mod = fig.add_subplot(grid[1, max(n_cam, 2) - 1])
    names = list(fractions)
    ax_mod.barh(names, [fractions[n] for n in names], color="tab:orange")
    ax_mod.set_xlim(0, 1)
    ax_mod.set_xlabel("fraction of attention")
    ax_mod.tick_params(axis="y", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_evolution(x: np.ndarray, series: Mapping[str, np.ndarray], path: str | os.PathLike,
                   xlabel: str = "time", ylabel: str = "fraction of attention",
                   title: str | None = None, reference: tuple[float, str] | None = None) -> pathlib.Path:
    """Line plot of several named series over a shared x axis (time, denoising step or layer); ``reference``
    (value, label) draws the baseline the series are read against as a grey horizontal line."""
    x = np.asarray(x)
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    for name, y in series.items():
        y = np.asarray(y)
        if y.shape != x.shape:
            raise ValueError(f"series {name!r} has shape {y.shape}, x has {x.shape}")
        if np.isfinite(y).any():  # a legend entry only for a line that is drawn
            ax.plot(x, y, marker="o" if x.size <= 30 else None, ms=3, label=name)
    if reference is not None:
        ax.axhline(reference[0], color="grey", lw=1, ls="--", label=reference[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def write_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: float = 10.0) -> pathlib.Path:
    """Write uint8 (H, W, 3) frames to an H.264 MP4; frames are padded (black, bottom/right) to multiples of 16."""
    import imageio.v2 as imageio

    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"no frames to write to {path}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=16) as writer:
        for frame in itertools.chain([first], frames):
            frame = np.asarray(frame, dtype=np.uint8)
            h, w = frame.shape[:2]
            writer.append_data(np.pad(frame, ((0, -h % 16), (0, -w % 16), (0, 0))))
    return path
