"""Attention-object alignment metrics on the patch grid, vectorised over N frames.

Why: "does the policy look at the object it manipulates?" needs numbers a reviewer trusts. All metrics work on
patch-level probabilities (never on an upsampled, min-max-normalised picture) and come with baselines, chance
levels and bootstrap intervals (docs/analyses.md section 1, ATTENTION_VIZ_README.md).

Definitions (P = grid_h * grid_w patches, per frame):

- **Attention** ``x`` (N, P): a camera's share of full attention rows. It is renormalised within the camera,
  ``p = x / sum(x)``, before every metric (all metrics below except soft mass are scale-invariant anyway).
- **Coverage** ``c`` (N, P): fraction of each patch's area covered by the selected instance ids (exact
  area-weighted pooling, see :func:`pool_masks`). **Binarised mask** ``m = c >= 0.5``; ``b = sum(m)``. A frame
  whose object is so small that no patch is half covered falls back to the single most-covered patch
  (``mask_fallback``). A frame with ``c == 0`` everywhere has an **empty mask**: it is flagged and excluded.
- **Soft mass** = ``sum(p * c)``: attention probability on the object, each patch weighted by its covered area.
  Uniform attention gives exactly the object's area fraction.
- **Binarisations** of ``p`` (each a selection weight ``w`` in [0, 1]^P):
  *top-k* keeps the ``k = b`` highest patches; *percentile* keeps the top ``k = round(q * P)`` patches with
  ``q = 1 - percentile / 100``; ties at the k-th value share the remaining slots fractionally, so
  ``sum(w) = k`` exactly and a constant map selects every patch with weight k / P (the expectation under random
  tie-breaking). *Otsu* keeps patches strictly above the threshold that maximises the between-class variance
  over the frame's P values (exact, no histogram); a constant map has no Otsu threshold -> NaN (undefined,
  excluded from means and counted).
- With ``I = sum(w * m)``, ``A = sum(w)``, ``B = b``: IoU = I / (A + B - I), Dice = 2I / (A + B),
  precision = I / A, recall = I / B (NaN where the denominator is 0).
- **Pointing** = mean of ``m`` over the patches holding the maximum of ``p`` (1 or 0 unless tied).
- **IoU ceiling / chance** of the percentile threshold, with ``a = b / P`` and ``q = k / P``:
  ceiling = min(a, q) / max(a, q), chance = a q / (a + q - a q).
- **Baselines**: ``uniform`` (1 / P everywhere) and ``center_bias`` (isotropic 2-D Gaussian centred on the
  grid centre ((gh - 1) / 2, (gw - 1) / 2) with sigma = ``sigma_frac`` * grid side, normalised to sum 1).
- **Bootstrap 95% CI**: percentile interval of the resampled mean; resampling frames, or whole groups
  (episodes) when groups are given. The point estimate and every resample weight frames equally.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

PAIR_METRICS: tuple[str, ...] = ("iou", "dice", "precision", "recall")


# --------------------------------------------------------------------------------------------------------------
# Masks -> patch grid
# --------------------------------------------------------------------------------------------------------------
def _overlap_matrix(n_pixels: int, n_cells: int) -> np.ndarray:
    """(n_cells, n_pixels) overlap length (in pixel units) of pixel j with grid cell i along one axis."""
    edges_cells = np.arange(n_cells + 1) * (n_pixels / n_cells)
    lo = np.maximum(edges_cells[:-1, None], np.arange(n_pixels)[None, :])
    hi = np.minimum(edges_cells[1:, None], np.arange(1, n_pixels + 1)[None, :])
    return np.clip(hi - lo, 0.0, None)


def pool_binary(binary: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool -> (N, gh, gw) fraction of each cell's area that is set.

    When H, W are multiples of the grid this is a block mean (integer counts, exact); otherwise each pixel is
    split between the cells it straddles in proportion to the overlapping area (exact area-weighted pooling,
    no resampling), computed as ``rows @ mask @ cols.T`` with 1-D overlap matrices.
    """
    if binary.dtype != np.bool_:
        raise TypeError(f"pool_binary expects a boolean mask, found dtype {binary.dtype}")
    n, h, w = binary.shape
    gh, gw = grid
    if h % gh == 0 and w % gw == 0:
        bh, bw = h // gh, w // gw
        blocks = binary.view(np.uint8).reshape(n, gh, bh, gw, bw)
        inner = blocks.sum(axis=4, dtype=np.uint8 if bw <= 255 else np.int64)
        return inner.sum(axis=2, dtype=np.int64) / float(bh * bw)
    rows = _overlap_matrix(h, gh)  # (gh, H)
    cols = _overlap_matrix(w, gw)  # (gw, W)
    cell_area = (h / gh) * (w / gw)
    per_row = binary.astype(np.float64).reshape(n * h, w) @ cols.T  # (N*H, gw)
    return np.matmul(rows, per_row.reshape(n, h, gw)) / cell_area


@dataclasses.dataclass(frozen=True)
class GridGeometry:
    """Where a model's attention grid lies on a saved camera frame.

    The model saw the frame resized with padding to ``image_hw`` (:func:`openpi.shared.image_tools.resize_with_pad`:
    aspect ratio kept, centred, zero padding), then cropped to ``crop_box`` (top, left, height, width, in
    ``image_hw`` pixels), and its grid divides that crop into ``grid`` equal cells, row-major. ``image_hw`` None:
    the model's image is the frame itself and the grid covers all of it (Pi0's patch grid on its 224x224 frame).
    """

    grid: tuple[int, int]
    image_hw: tuple[int, int] | None = None
    crop_box: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.grid) != 2 or min(self.grid) <= 0:
            raise ValueError(f"grid must be two positive ints, got {self.grid}")
        if self.image_hw is None:
            if self.crop_box is not None:
                raise ValueError("a crop_box needs the image_hw it is taken from")
            return
        h, w = self.image_hw
        top, left, ch, cw = self.crop_box if self.crop_box is not None else (0, 0, h, w)
        if min(h, w, ch, cw) <= 0 or top < 0 or left < 0 or top + ch > h or left + cw > w:
            raise ValueError(f"crop_box {self.crop_box} does not fit in an image of {self.image_hw}")

    @property
    def whole_frame(self) -> bool:
        return self.image_hw is None

    def cell_edges(self, frame_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(grid_h + 1,) row and (grid_w + 1,) column edges of the cells in frame pixel coordinates (pixel j spans
        [j, j + 1)); edges outside [0, frame size] lie in the padding, which shows no part of the frame."""
        from openpi.shared.image_tools import pad_geometry

        fh, fw = frame_hw
        gh, gw = self.grid
        if self.whole_frame:
            return np.arange(gh + 1) * (fh / gh), np.arange(gw + 1) * (fw / gw)
        geo = pad_geometry(fh, fw, *self.image_hw)
        top, left, ch, cw = self.crop_box if self.crop_box is not None else (0, 0, *self.image_hw)
        # model pixel y' = pad_top + y * resized_h / fh  <=>  y = (y' - pad_top) * fh / resized_h
        rows = (top + np.arange(gh + 1) * (ch / gh) - geo.pad_top) * (fh / geo.resized_h)
        cols = (left + np.arange(gw + 1) * (cw / gw) - geo.pad_left) * (fw / geo.resized_w)
        return rows, cols

    def cell_of_pixels(self, frame_hw: tuple[int, int]) -> np.ndarray:
        """(H, W) int: the row-major cell holding each frame pixel's centre, -1 outside the cells (cropped away)."""
        rows, cols = self.cell_edges(frame_hw)
        r = np.searchsorted(rows, np.arange(frame_hw[0]) + 0.5, side="right") - 1
        c = np.searchsorted(cols, np.arange(frame_hw[1]) + 0.5, side="right") - 1
        r = np.where((r >= 0) & (r < self.grid[0]), r, -1)
        c = np.where((c >= 0) & (c < self.grid[1]), c, -1)
        cell = r[:, None] * self.grid[1] + c[None, :]
        return np.where((r[:, None] >= 0) & (c[None, :] >= 0), cell, -1)

    def frame_heatmap(self, heat: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
        """(grid_h, grid_w) cell values -> (H, W) float32 on the frame, each pixel its cell's value (0 outside the
        crop), for drawing attention where the model's cells lie."""
        heat = np.asarray(heat, np.float32).reshape(-1)
        cell = self.cell_of_pixels(frame_hw)
        return np.where(cell >= 0, heat[np.maximum(cell, 0)], 0.0).astype(np.float32)

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "image_hw": None if self.image_hw is None else list(self.image_hw),
                "crop_box": None if self.crop_box is None else list(self.crop_box)}


def _edge_overlap(edges: np.ndarray, n_pixels: int) -> np.ndarray:
    """(cells, n_pixels) overlap length of pixel j ([j, j + 1)) with cell i ([edges[i], edges[i + 1]))."""
    lo = np.maximum(edges[:-1, None], np.arange(n_pixels)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(1, n_pixels + 1)[None, :])
    return np.clip(hi - lo, 0.0, None)


def pool_binary_on(binary: np.ndarray, geometry: GridGeometry) -> np.ndarray:
    """(N, H, W) bool frames -> (N, gh * gw) fraction of each cell's area that is set, through ``geometry``
    (resize with padding, crop, grid). A cell's area is counted whole, padding included: the model saw no object
    there. The whole-frame geometry is :func:`pool_binary` itself."""
    if geometry.whole_frame:
        return pool_binary(binary, geometry.grid).reshape(binary.shape[0], -1)
    if binary.dtype != np.bool_:
        raise TypeError(f"pool_binary_on expects a boolean mask, found dtype {binary.dtype}")
    n, h, w = binary.shape
    row_edges, col_edges = geometry.cell_edges((h, w))
    rows, cols = _edge_overlap(row_edges, h), _edge_overlap(col_edges, w)
    area = np.diff(row_edges)[:, None] * np.diff(col_edges)[None, :]  # (gh, gw), frame pixel units
    per_row = binary.astype(np.float64).reshape(n * h, w) @ cols.T  # (N*H, gw)
    out = np.matmul(rows, per_row.reshape(n, h, -1)) / area
    return out.reshape(n, -1)


def pool_objects_on(masks: np.ndarray, ids: Sequence[int], geometry: GridGeometry,
                    chunk: int = 512) -> dict[int, np.ndarray]:
    """:func:`pool_objects` through a :class:`GridGeometry`: coverage (N, P) of each instance id."""
    if geometry.whole_frame:
        return pool_objects(masks, ids, geometry.grid, chunk)
    arr = _stack_masks(masks)
    out = {}
    for i in ids:
        parts = [pool_binary_on(np.asarray(arr[s:s + chunk]) == i, geometry) for s in range(0, len(arr), chunk)]
        out[int(i)] = np.concatenate(parts) if parts else np.zeros((0, geometry.grid[0] * geometry.grid[1]))
    return out


def _stack_masks(masks: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    if isinstance(masks, np.ndarray):
        arr = masks
    else:
        masks = list(masks)
        if not masks:
            raise ValueError("no masks given")
        shape0 = np.shape(masks[0])
        for i, m in enumerate(masks):
            if np.shape(m) != shape0:
                raise ValueError(f"mask {i} has shape {np.shape(m)}, but mask 0 has {shape0}: all masks must "
                                 "share one size")
        arr = np.stack([np.asarray(m) for m in masks])
    if arr.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), found shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"masks must hold integer instance ids, found dtype {arr.dtype}")
    return arr


def pool_masks(masks: np.ndarray | Sequence[np.ndarray], ids: Sequence[int], grid: tuple[int, int] = (16, 16),
               chunk: int = 512) -> np.ndarray:
    """Integer instance masks (N, H, W) -> coverage (N, gh*gw) of the union of ``ids``, row-major patches."""
    arr = _stack_masks(masks)
    ids_arr = np.asarray(list(ids), dtype=arr.dtype)
    if ids_arr.size == 0:
        raise ValueError("no instance ids selected")
    if arr.shape[1] < grid[0] or arr.shape[2] < grid[1]:
        raise ValueError(f"masks of size {arr.shape[1:]} are smaller than the {grid[0]}x{grid[1]} grid")
    out = np.empty((arr.shape[0], grid[0] * grid[1]), dtype=np.float64)
    for start in range(0, arr.shape[0], chunk):
        block = np.asarray(arr[start:start + chunk])
        sel = block == ids_arr[0] if ids_arr.size == 1 else np.isin(block, ids_arr)
        out[start:start + chunk] = pool_binary(sel, grid).reshape(sel.shape[0], -1)
    return out


# --------------------------------------------------------------------------------------------------------------
# Attention checks and baselines
# --------------------------------------------------------------------------------------------------------------
def validate_attention(att: np.ndarray, require_normalised: bool = False, atol: float = 1e-3,
                       source: str = "attention") -> None:
    """Raise on rows that are not camera probability shares: NaN/inf, negative, all zero (or not summing to 1)."""
    if att.ndim != 2:
        raise ValueError(f"{source}: expected (N, patches), found shape {att.shape}")
    if not np.issubdtype(att.dtype, np.floating):
        raise ValueError(f"{source}: expected floating point probabilities, found dtype {att.dtype}")

    def _first(bad: np.ndarray) -> str:
        rows = np.flatnonzero(bad)
        return f"{rows.size} row(s), first {rows[:5].tolist()}"

    bad = ~np.all(np.isfinite(att), axis=1)
    if bad.any():
        raise ValueError(f"{source}: NaN or inf values in {_first(bad)}")
    bad = np.any(att < 0, axis=1)
    if bad.any():
        raise ValueError(f"{source}: negative probabilities in {_first(bad)}")
    sums = att.sum(axis=1)
    bad = sums <= 0
    if bad.any():
        raise ValueError(f"{source}: all-zero rows (no attention on the camera) in {_first(bad)}")
    if require_normalised:
        bad = np.abs(sums - 1.0) > atol
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{source}: --require-normalised but {_first(bad)} do not sum to 1 "
                             f"(row {i} sums to {sums[i]:.6g}, tolerance {atol})")


def normalise_rows(att: np.ndarray) -> np.ndarray:
    """Renormalise each row to sum 1 (within-camera distribution)."""
    att = np.asarray(att, dtype=np.float64)
    return att / att.sum(axis=1, keepdims=True)


def uniform_map(grid: tuple[int, int]) -> np.ndarray:
    """Uniform attention over the P patches, shape (P,)."""
    p = grid[0] * grid[1]
    return np.full(p, 1.0 / p)


def center_bias_map(grid: tuple[int, int], sigma_frac: float = 0.25) -> np.ndarray:
    """Isotropic Gaussian centred on the grid centre, sigma = sigma_frac * side (per axis), sums to 1; shape (P,)."""
    gh, gw = grid
    r = (np.arange(gh) - (gh - 1) / 2.0) / (sigma_frac * gh)
    c = (np.arange(gw) - (gw - 1) / 2.0) / (sigma_frac * gw)
    g = np.exp(-0.5 * (r[:, None] ** 2 + c[None, :] ** 2))
    return (g / g.sum()).reshape(-1)


# --------------------------------------------------------------------------------------------------------------
# Binarisation and metrics
# --------------------------------------------------------------------------------------------------------------
def binarise_mask(coverage: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coverage (N, P) -> (binary mask (N, P) bool, empty (N,) bool, fallback (N,) bool).

    Patches covered by at least ``threshold`` are in the mask; a non-empty object covering no patch that much
    falls back to its most-covered patch (flagged) so that top-k still has k >= 1.
    """
    m = coverage >= threshold
    empty = ~np.any(coverage > 0, axis=1)
    fallback = ~np.any(m, axis=1) & ~empty
    if fallback.any():
        rows = np.flatnonzero(fallback)
        m[rows, np.argmax(coverage[rows], axis=1)] = True
    return m, empty, fallback


def topk_weights(p: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Selection weights (N, P) for the top ``k`` (N,) entries per row; ties at the k-th value share the rest."""
    n, P = p.shape
    k = np.clip(np.asarray(k, dtype=np.int64), 0, P)
    desc = -np.sort(-p, axis=1)
    kth = desc[np.arange(n), np.maximum(k - 1, 0)]
    above = p > kth[:, None]
    tie = p == kth[:, None]
    n_above = above.sum(axis=1)
    n_tie = np.maximum(tie.sum(axis=1), 1)
    share = (k - n_above) / n_tie
    w = above + tie * share[:, None]
    w[k == 0] = 0.0
    return w


def otsu_weights(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Otsu foreground per row (exact over the row's values): (weights (N, P) in {0, 1}, thresholds (N,)).

    Rows with a single distinct value have no threshold: NaN threshold, zero weights.
    """
    n, P = p.shape
    s = np.sort(p, axis=1)
    csum = np.cumsum(s, axis=1)
    total = csum[:, -1:]
    n0 = np.arange(1, P, dtype=np.float64)[None, :]  # size of the lower class for a split after index i
    mu0 = csum[:, :-1] / n0
    mu1 = (total - csum[:, :-1]) / (P - n0)
    between = (n0 / P) * (1 - n0 / P) * (mu0 - mu1) ** 2
    valid = s[:, 1:] > s[:, :-1]  # only splits between distinct values are realisable thresholds
    between = np.where(valid, between, -np.inf)
    best = np.argmax(between, axis=1)
    thr = s[np.arange(n), best]
    defined = valid.any(axis=1)
    thr = np.where(defined, thr, np.nan)
    w = (p > thr[:, None]) & defined[:, None]
    return w.astype(np.float64), thr


def pair_metrics(w: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
    """IoU, Dice, precision and recall of selection weights ``w`` against binary mask ``m``, each (N,)."""
    inter = np.einsum("np,np->n", w, m.astype(np.float64))
    a = w.sum(axis=1)
    b = m.sum(axis=1).astype(np.float64)
    union = a + b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "iou": np.where(union > 0, inter / union, np.nan),
            "dice": np.where(a + b > 0, 2 * inter / (a + b), np.nan),
            "precision": np.where(a > 0, inter / a, np.nan),
            "recall": np.where(b > 0, inter / b, np.nan),
        }


def pointing(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Fraction of the row's maximal patches that lie in the mask (1/0 for a unique maximum)."""
    top = p == p.max(axis=1, keepdims=True)
    return (top & m).sum(axis=1) / top.sum(axis=1)


def iou_ceiling(a: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Best IoU reachable when keeping fraction q of the image against an object covering fraction a."""
    a, q = np.asarray(a, dtype=np.float64), np.asarray(q, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.maximum(a, q) > 0, np.minimum(a, q) / np.maximum(a, q), np.nan)


def iou_chance(a: np.ndarray, q: np.ndarray) -> np.ndarray:
    """IoU expected from a random selection of fraction q against an object covering fraction a."""
    a, q = np.asarray(a, dtype=np.float64), np.asarray(q, dtype=np.float64)
    den = a + q - a * q
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, a * q / den, np.nan)


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """A pooled mask and what the metrics need from it (all arrays have N rows)."""

    coverage: np.ndarray  # (N, P) area fraction
    binary: np.ndarray  # (N, P) bool
    empty: np.ndarray  # (N,) no selected pixel in the frame
    fallback: np.ndarray  # (N,) no patch half covered: most-covered patch used

    @classmethod
    def from_coverage(cls, coverage: np.ndarray, threshold: float = 0.5) -> MaskInfo:
        binary, empty, fallback = binarise_mask(coverage, threshold)
        return cls(coverage, binary, empty, fallback)

    @property
    def area(self) -> np.ndarray:
        return self.coverage.mean(axis=1)

    @property
    def n_patches(self) -> np.ndarray:
        return self.binary.sum(axis=1)


def percentile_k(percentile: float, n_patches: int) -> int:
    """Patches kept by the percentile threshold: the top round((1 - percentile / 100) * P), at least 1."""
    if not 0.0 <= percentile < 100.0:
        raise ValueError(f"percentile must be in [0, 100), found {percentile}")
    return max(1, int(round((1.0 - percentile / 100.0) * n_patches)))


def frame_metrics(p: np.ndarray, mask: MaskInfo, percentile: float = 90.0) -> dict[str, np.ndarray]:
    """Every per-frame metric of within-camera distributions ``p`` (N, P) against ``mask``; arrays of shape (N,).

    Keys: ``soft_mass``, ``pointing_accuracy``, ``{iou,dice,precision,recall}_{topk,percentile,otsu}``,
    ``otsu_threshold``. Values of empty-mask frames are NaN.
    """
    n, P = p.shape
    if mask.coverage.shape != (n, P):
        raise ValueError(f"attention is {p.shape} but pooled masks are {mask.coverage.shape}")
    m = mask.binary
    out: dict[str, np.ndarray] = {
        "soft_mass": np.einsum("np,np->n", p, mask.coverage),
        "pointing_accuracy": pointing(p, m),
    }
    k_pct = np.full(n, percentile_k(percentile, P))
    otsu_w, otsu_thr = otsu_weights(p)
    selections = {"topk": topk_weights(p, mask.n_patches), "percentile": topk_weights(p, k_pct), "otsu": otsu_w}
    for method, w in selections.items():
        for name, val in pair_metrics(w, m).items():
            out[f"{name}_{method}"] = val
    for name in PAIR_METRICS:  # a constant map has no Otsu split: undefined, not zero
        out[f"{name}_otsu"][np.isnan(otsu_thr)] = np.nan
    out["otsu_threshold"] = otsu_thr
    for val in out.values():
        val[mask.empty] = np.nan
    return out


def percentile_reference(mask: MaskInfo, percentile: float = 90.0) -> dict[str, np.ndarray]:
    """IoU ceiling and chance level of the percentile threshold per frame (NaN for empty masks)."""
    P = mask.binary.shape[1]
    q = percentile_k(percentile, P) / P
    a = mask.n_patches / P
    ceiling = np.where(mask.empty, np.nan, iou_ceiling(a, q))
    chance = np.where(mask.empty, np.nan, iou_chance(a, q))
    return {"iou_ceiling_percentile": ceiling, "iou_chance_percentile": chance}


def evaluate(att: np.ndarray, mask: MaskInfo, percentile: float = 90.0, sigma_frac: float = 0.25,
             grid: tuple[int, int] = (16, 16)) -> dict[str, dict[str, np.ndarray]]:
    """Metrics of the attention and of both baselines: ``{"attention"|"uniform"|"center_bias": {metric: (N,)}}``.

    ``att`` is validated by the caller (see :func:`validate_attention`) and renormalised here.
    """
    n, P = att.shape
    if P != grid[0] * grid[1]:
        raise ValueError(f"attention has {P} patches per row but the {grid[0]}x{grid[1]} grid has "
                         f"{grid[0] * grid[1]}")
    results = {"attention": frame_metrics(normalise_rows(att), mask, percentile)}
    for name, base in (("uniform", uniform_map(grid)), ("center_bias", center_bias_map(grid, sigma_frac))):
        results[name] = frame_metrics(np.broadcast_to(base, (n, P)).copy(), mask, percentile)
    results["attention"].update(percentile_reference(mask, percentile))
    return results


# --------------------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------------------
def bootstrap_means(values: Mapping[str, np.ndarray], groups: np.ndarray | None = None, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95, chunk: int = 250) -> dict[str, dict[str, float]]:
    """Mean and percentile bootstrap CI of each (N,) metric, ignoring NaN frames; resampling frames or groups.

    Returns ``{metric: {"mean", "ci_low", "ci_high", "n"}}`` (``n`` = non-NaN frames; NaN stats when n == 0).
    All metrics share the same resamples. With groups, whole groups are drawn with replacement and the
    resampled mean is (sum over drawn frames) / (count of drawn frames).
    """
    names = list(values)
    if not names:
        return {}
    V = np.stack([np.asarray(values[k], dtype=np.float64) for k in names], axis=1)  # (N, M)
    n = V.shape[0]
    if groups is None:
        gid = np.arange(n)
    else:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups has shape {groups.shape}, expected ({n},) (one group per frame)")
        _, gid = np.unique(groups, return_inverse=True)
    valid = ~np.isnan(V)
    n_groups = int(gid.max()) + 1 if n else 0
    S = np.zeros((n_groups, V.shape[1]))
    C = np.zeros((n_groups, V.shape[1]))
    np.add.at(S, gid, np.where(valid, V, 0.0))
    np.add.at(C, gid, valid.astype(np.float64))
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, V.shape[1]))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups)) + (np.arange(b) * n_groups)[:, None]
        W = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            boot[start:start + b] = (W @ S) / (W @ C)
    alpha = (1.0 - level) / 2.0
    out = {}
    for j, name in enumerate(names):
        cnt = int(C[:, j].sum())
        if cnt == 0:
            out[name] = {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
            continue
        col = boot[:, j]
        col = col[~np.isnan(col)]
        lo, hi = (np.quantile(col, [alpha, 1.0 - alpha]) if col.size else (np.nan, np.nan))
        out[name] = {"mean": float(S[:, j].sum() / cnt), "ci_low": float(lo), "ci_high": float(hi), "n": cnt}
    return out


# --------------------------------------------------------------------------------------------------------------
# Full report (what attention_iou.py writes)
# --------------------------------------------------------------------------------------------------------------
PER_OBJECT_FRAME_KEYS: tuple[str, ...] = ("soft_mass", "iou_topk", "pointing_accuracy")
EMPTY_MASK_WARNING = "empty mask: no selected object pixel in this frame; excluded from aggregates"


def present_ids(masks: np.ndarray, chunk: int = 512) -> list[int]:
    """Sorted non-zero instance ids present anywhere in ``masks`` (read in chunks, so memory-mapped input is fine)."""
    found: set[int] = set()
    for start in range(0, masks.shape[0], chunk):
        found.update(np.unique(masks[start:start + chunk]).tolist())
    return sorted(i for i in found if i != 0)


def pool_objects(masks: np.ndarray, ids: Sequence[int], grid: tuple[int, int],
                 chunk: int = 512) -> dict[int, np.ndarray]:
    """Coverage (N, P) per instance id (ids are exclusive per pixel, so the union's coverage is their sum)."""
    return {int(i): pool_masks(masks, [i], grid, chunk) for i in ids}


def _rows(metrics: Mapping[str, np.ndarray], keys: Sequence[str]) -> list[dict[str, float]]:
    cols = {k: np.asarray(metrics[k]).tolist() for k in keys}
    n = len(next(iter(cols.values()))) if cols else 0
    return [{k: cols[k][i] for k in keys} for i in range(n)]


def iou_report(att: np.ndarray, object_coverage: Mapping[int, np.ndarray], grid: tuple[int, int] = (16, 16),
               groups: np.ndarray | None = None, percentile: float = 90.0, sigma_frac: float = 0.25,
               n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-frame and aggregate metrics for the union of the objects and for each object (schema in the README).

    ``att`` (N, P): validated camera shares; ``object_coverage``: {id: (N, P) coverage} from :func:`pool_objects`.
    """
    n, P = att.shape
    if not object_coverage:
        raise ValueError("no objects selected")
    union_cov = np.clip(sum(object_coverage.values()), 0.0, 1.0)
    union = MaskInfo.from_coverage(union_cov)
    res = evaluate(att, union, percentile, sigma_frac, grid)
    used = ~union.empty

    def agg(metrics: Mapping[str, np.ndarray], keep: np.ndarray) -> dict:
        vals = {k: np.where(keep, v, np.nan) for k, v in metrics.items() if k != "otsu_threshold"}
        return bootstrap_means(vals, groups, n_boot, seed)

    report: dict = {
        "aggregate": agg(res["attention"], used),
        "baselines": {b: agg(res[b], used) for b in ("uniform", "center_bias")},
        "per_object": {},
    }
    metric_keys = list(res["attention"])
    base_keys = [k for k in res["uniform"] if k != "otsu_threshold"]
    per_frame = _rows(res["attention"], metric_keys)
    base_rows = {b: _rows(res[b], base_keys) for b in ("uniform", "center_bias")}
    share, area, n_patches = att.sum(axis=1).tolist(), union.area.tolist(), union.n_patches.tolist()
    fallback, empty = union.fallback.tolist(), union.empty.tolist()
    for i, row in enumerate(per_frame):
        row.update({"frame": i, "camera_share": share[i], "mask_area": area[i], "mask_patches": n_patches[i],
                    "mask_fallback": fallback[i], "warning": EMPTY_MASK_WARNING if empty[i] else None,
                    "baselines": {b: base_rows[b][i] for b in base_rows}, "objects": {}})
        if groups is not None:
            row["group"] = groups[i].item() if hasattr(groups[i], "item") else groups[i]

    for oid, cov in object_coverage.items():
        info = MaskInfo.from_coverage(cov)
        ores = evaluate(att, info, percentile, sigma_frac, grid)
        present = ~info.empty
        report["per_object"][str(oid)] = {
            "n_frames_present": int(present.sum()),
            "aggregate": agg(ores["attention"], present),
            "baselines": {b: agg(ores[b], present) for b in ("uniform", "center_bias")},
        }
        cols = {k: ores["attention"][k].tolist() for k in PER_OBJECT_FRAME_KEYS}
        obj_area, obj_present = info.area.tolist(), present.tolist()
        for i, row in enumerate(per_frame):
            row["objects"][str(oid)] = ({k: cols[k][i] for k in PER_OBJECT_FRAME_KEYS} | {"mask_area": obj_area[i]}
                                        if obj_present[i] else None)

    report["per_frame"] = per_frame
    report["counts"] = {
        "n_frames": n,
        "n_used": int(used.sum()),
        "n_excluded_empty_mask": int(union.empty.sum()),
        "excluded_frames": np.flatnonzero(union.empty).tolist(),
        "n_mask_fallback": int(union.fallback.sum()),
        "n_groups": None if groups is None else int(np.unique(groups).size),
        "bootstrap_unit": "frame" if groups is None else "group",
    }
    return report
