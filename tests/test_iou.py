"""Attention-object metrics on planted answers, plus the attention_iou.py command line."""
import json
import pathlib
import runpy
import types

import numpy as np
import pytest

from openpi.interp import iou

GRID = (16, 16)
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def patch_box_mask(n: int, r0: int, r1: int, c0: int, c1: int, oid: int = 3, size: int = 224) -> np.ndarray:
    """Masks whose object covers exactly patches rows r0..r1-1, cols c0..c1-1 (14-pixel patches)."""
    m = np.zeros((n, size, size), np.int32)
    m[:, r0 * 14:r1 * 14, c0 * 14:c1 * 14] = oid
    return m


def patch_ids(r0, r1, c0, c1):
    return np.array([r * 16 + c for r in range(r0, r1) for c in range(c0, c1)])


def load_cli():
    """The attention_iou.py script's namespace (Args, run)."""
    return types.SimpleNamespace(**runpy.run_path(str(REPO_ROOT / "attention_iou.py")))


def test_attention_exactly_on_mask_gives_iou_and_soft_mass_one():
    masks = patch_box_mask(4, 3, 6, 5, 9)
    cov = iou.pool_masks(masks, [3], GRID)
    att = np.zeros((4, 256))
    att[:, patch_ids(3, 6, 5, 9)] = 0.02  # a camera share of 0.24, not normalised
    res = iou.evaluate(att, iou.MaskInfo.from_coverage(cov))["attention"]
    for key in ("soft_mass", "iou_topk", "dice_topk", "precision_topk", "recall_topk", "pointing_accuracy",
                "iou_otsu"):
        np.testing.assert_allclose(res[key], 1.0, err_msg=key)
    # the percentile threshold keeps 26 patches against a 12-patch object: IoU hits exactly its ceiling
    np.testing.assert_allclose(res["iou_percentile"], 12 / 26)
    np.testing.assert_allclose(res["iou_ceiling_percentile"], 12 / 26)


def test_uniform_attention_soft_mass_is_area_fraction():
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 224, 224), np.int32)
    for i in range(5):  # boxes not aligned to patches
        r, c = rng.integers(0, 150, 2)
        masks[i, r:r + rng.integers(5, 70), c:c + rng.integers(5, 70)] = 7
    cov = iou.pool_masks(masks, [7], GRID)
    res = iou.evaluate(np.full((5, 256), 0.3 / 256), iou.MaskInfo.from_coverage(cov))
    area = (masks == 7).mean(axis=(1, 2))
    np.testing.assert_allclose(res["attention"]["soft_mass"], area, rtol=1e-12)
    np.testing.assert_allclose(res["uniform"]["soft_mass"], area, rtol=1e-12)
    # top-k with k = b on a constant map: ties share the slots, giving the chance IoU a*a/(2a - a*a)
    a = iou.MaskInfo.from_coverage(cov).n_patches / 256
    np.testing.assert_allclose(res["uniform"]["iou_topk"], iou.iou_chance(a, a))
    np.testing.assert_allclose(res["uniform"]["pointing_accuracy"], a)
    assert np.all(np.isnan(res["uniform"]["iou_otsu"]))  # a constant map has no Otsu split


def test_non_divisible_masks_pooled_by_exact_area():
    rng = np.random.default_rng(1)
    masks = (rng.random((3, 37, 29)) < 0.3).astype(np.int32) * 2
    cov = iou.pool_masks(masks, [2], GRID)
    # brute force: supersample by 16 so the grid divides, then block-average
    big = np.repeat(np.repeat(masks == 2, 16, axis=1), 16, axis=2)
    ref = big.reshape(3, 16, 37, 16, 29).mean(axis=(2, 4)).reshape(3, -1)
    np.testing.assert_allclose(cov, ref, atol=1e-12)
    # and uniform attention still gives the area fraction
    res = iou.frame_metrics(np.full((3, 256), 1 / 256), iou.MaskInfo.from_coverage(cov))
    np.testing.assert_allclose(res["soft_mass"], (masks == 2).mean(axis=(1, 2)), atol=1e-12)


def test_center_bias_baseline():
    cb = iou.center_bias_map(GRID)
    assert cb.sum() == pytest.approx(1.0)
    hm = cb.reshape(16, 16)
    assert set(np.flatnonzero(cb == cb.max()).tolist()) == {7 * 16 + 7, 7 * 16 + 8, 8 * 16 + 7, 8 * 16 + 8}
    np.testing.assert_allclose(hm, hm[::-1, ::-1])
    assert hm[0, 0] < hm[4, 4] < hm[7, 7]
    u = iou.uniform_map(GRID)
    assert u.sum() == pytest.approx(1.0) and np.all(u == u[0])


def test_otsu_picks_planted_set_of_bimodal_map():
    rng = np.random.default_rng(2)
    att = rng.uniform(0.0, 0.1, (6, 256))
    planted = [rng.choice(256, size=s, replace=False) for s in (5, 12, 30, 40, 60, 100)]
    for i, idx in enumerate(planted):
        att[i, idx] = rng.uniform(0.8, 1.0, idx.size)
    w, thr = iou.otsu_weights(iou.normalise_rows(att))
    for i, idx in enumerate(planted):
        assert set(np.flatnonzero(w[i]).tolist()) == set(idx.tolist()), i
    assert not np.any(np.isnan(thr))


def test_topk_and_percentile_counts_and_ties():
    p = np.array([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    w = iou.topk_weights(p, np.array([2, 1]))
    np.testing.assert_allclose(w, [[1, 0.5, 0.5, 0], [0.25, 0.25, 0.25, 0.25]])
    rng = np.random.default_rng(3)
    masks = patch_box_mask(2, 0, 4, 0, 4)
    info = iou.MaskInfo.from_coverage(iou.pool_masks(masks, [3], GRID))
    att = rng.random((2, 256))
    res = iou.frame_metrics(iou.normalise_rows(att), info, percentile=90)
    # recall of the percentile selection = fraction of the 16 mask patches among the top 26 attention patches
    top26 = np.argsort(-att, axis=1)[:, :26]
    expected = [np.isin(patch_ids(0, 4, 0, 4), top26[i]).mean() for i in range(2)]
    np.testing.assert_allclose(res["recall_percentile"], expected)


def test_ceiling_and_chance_formulas():
    assert iou.iou_ceiling(0.03, 0.1) == pytest.approx(0.3)
    assert iou.iou_ceiling(0.2, 0.1) == pytest.approx(0.5)
    assert iou.iou_chance(0.03, 0.1) == pytest.approx(0.003 / (0.13 - 0.003))
    # chance is the IoU of a random selection: check by simulation
    rng = np.random.default_rng(4)
    m = np.zeros((4000, 100), bool)
    m[:, :20] = True
    sel = np.argsort(rng.random((4000, 100)), axis=1)[:, :30]
    w = np.zeros((4000, 100))
    np.put_along_axis(w, sel, 1.0, axis=1)
    inter = (w * m).sum(1)
    sim = inter.mean() / (50 - inter.mean())
    assert sim == pytest.approx(iou.iou_chance(0.2, 0.3), rel=0.02)


def test_empty_and_tiny_masks():
    masks = np.zeros((3, 224, 224), np.int32)
    masks[1, 100, 100] = 5  # one pixel: no patch half covered -> fallback to the covering patch
    masks[2, 0:14, 0:14] = 5
    info = iou.MaskInfo.from_coverage(iou.pool_masks(masks, [5], GRID))
    assert info.empty.tolist() == [True, False, False]
    assert info.fallback.tolist() == [False, True, False]
    assert np.flatnonzero(info.binary[1]).tolist() == [7 * 16 + 7]
    att = np.zeros((3, 256))
    att[:, 7 * 16 + 7] = 1.0
    res = iou.evaluate(att, info)["attention"]
    assert np.isnan(res["soft_mass"][0]) and np.isnan(res["iou_topk"][0])
    assert res["iou_topk"][1] == 1.0 and res["pointing_accuracy"][2] == 0.0


def test_validate_attention_errors():
    good = np.full((3, 256), 0.001)
    iou.validate_attention(good)
    for bad, msg in [(-good, "negative"), (np.zeros((3, 256)), "all-zero"), (good * np.nan, "NaN")]:
        with pytest.raises(ValueError, match=msg):
            iou.validate_attention(bad)
    with pytest.raises(ValueError, match="do not sum to 1"):
        iou.validate_attention(good, require_normalised=True)
    iou.validate_attention(np.full((3, 256), 1 / 256), require_normalised=True)
    with pytest.raises(ValueError, match="mask 1 has shape \\(20, 20\\)"):
        iou.pool_masks([np.zeros((16, 16), int), np.zeros((20, 20), int)], [1], GRID)


def test_bootstrap_frames_and_groups():
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(20), 25)
    vals = np.repeat(rng.normal(0, 1, 20), 25) + rng.normal(0, 0.01, 500)  # strong episode effect
    vals_nan = vals.copy()
    vals_nan[:7] = np.nan
    frame = iou.bootstrap_means({"x": vals, "y": vals_nan}, None, n_boot=500, seed=0)
    group = iou.bootstrap_means({"x": vals}, g, n_boot=500, seed=0)
    assert frame["x"]["mean"] == pytest.approx(vals.mean()) == group["x"]["mean"]
    assert frame["y"]["n"] == 493 and frame["y"]["mean"] == pytest.approx(np.nanmean(vals_nan))
    for r in (frame["x"], group["x"]):
        assert r["ci_low"] < r["mean"] < r["ci_high"]
    # frames inside an episode are not independent: the episode bootstrap must be much wider
    width = lambda r: r["ci_high"] - r["ci_low"]  # noqa: E731
    assert width(group["x"]) > 3 * width(frame["x"])
    # the group CI should be close to the normal-theory CI of the mean of 20 episode means
    ep_means = vals.reshape(20, 25).mean(1)
    assert width(group["x"]) == pytest.approx(2 * 1.96 * ep_means.std() / np.sqrt(20), rel=0.25)
    assert iou.bootstrap_means({"x": vals}, g, n_boot=500, seed=0) == group
    empty = iou.bootstrap_means({"z": np.full(5, np.nan)}, None, n_boot=10)
    assert empty["z"]["n"] == 0 and np.isnan(empty["z"]["mean"])


def write_inputs(tmp_path, n=40, size=224):
    masks = patch_box_mask(n, 3, 6, 5, 9, oid=4, size=size)
    masks[:, 150:200, 10:60] = 9
    masks[5] = 0  # no object at all in frame 5
    att = np.full((n, 256), 1e-5)
    att[:, patch_ids(3, 6, 5, 9)] = 0.03
    np.save(tmp_path / "att.npy", att)
    np.save(tmp_path / "masks.npy", masks)
    np.save(tmp_path / "groups.npy", np.repeat(np.arange(n // 4), 4))
    return att, masks


def test_cli_schema_and_planted_values(tmp_path):
    write_inputs(tmp_path)
    cli = load_cli()
    out = cli.run(cli.Args(attention=tmp_path / "att.npy", masks=tmp_path / "masks.npy", out=tmp_path / "o",
                           objects=(4,), groups=tmp_path / "groups.npy", n_boot=200))
    data = json.loads((tmp_path / "o" / "iou.json").read_text())
    assert data["schema_version"] == 1 and data["objects"] == [4] == out["objects"]
    assert len(data["per_frame"]) == 40
    for key in ("soft_mass", "pointing_accuracy", "iou_topk", "iou_percentile", "iou_otsu",
                "iou_ceiling_percentile", "iou_chance_percentile"):
        assert set(data["aggregate"][key]) >= {"mean", "ci_low", "ci_high"}
    assert data["aggregate"]["iou_topk"]["mean"] == pytest.approx(1.0)
    assert data["aggregate"]["soft_mass"]["mean"] == pytest.approx(0.36 / (0.36 + 244e-5))
    for base in ("uniform", "center_bias"):
        for key in ("soft_mass", "pointing_accuracy", "iou_topk"):
            assert set(data["baselines"][base][key]) >= {"mean", "ci_low", "ci_high"}
    assert data["baselines"]["uniform"]["soft_mass"]["mean"] == pytest.approx(12 / 256)
    assert data["counts"]["n_excluded_empty_mask"] == 1 and data["counts"]["excluded_frames"] == [5]
    assert data["aggregate"]["soft_mass"]["n"] == 39
    assert data["per_frame"][5]["warning"] and data["per_frame"][5]["iou_topk"] is None
    assert data["per_frame"][0]["warning"] is None and data["per_frame"][0]["group"] == 0
    assert data["counts"]["bootstrap_unit"] == "group" and data["counts"]["n_groups"] == 10
    assert data["per_object"]["4"]["n_frames_present"] == 39

    # default objects: every non-zero id; union of 4 and 9 lowers IoU(top-k) but soft mass stays
    cli.run(cli.Args(attention=tmp_path / "att.npy", masks=tmp_path / "masks.npy", out=tmp_path / "all", n_boot=50))
    all_ids = json.loads((tmp_path / "all" / "iou.json").read_text())
    assert all_ids["objects"] == [4, 9]
    assert all_ids["aggregate"]["iou_topk"]["mean"] < 0.9
    assert all_ids["per_object"]["4"]["aggregate"]["iou_topk"]["mean"] == pytest.approx(1.0)


def test_cli_bad_input_errors_and_keeps_output(tmp_path):
    att, masks = write_inputs(tmp_path)
    cli = load_cli()
    out = tmp_path / "o"
    out.mkdir()
    (out / "iou.json").write_text("previous")
    base = dict(attention=tmp_path / "att.npy", masks=tmp_path / "masks.npy", out=out)

    np.save(tmp_path / "short.npy", att[:30])
    with pytest.raises(ValueError, match="N=30 frames .* N=40"):
        cli.run(cli.Args(**{**base, "attention": tmp_path / "short.npy"}))
    with pytest.raises(ValueError, match="256 patches per row, but --grid 14"):
        cli.run(cli.Args(**base, grid=14))
    np.save(tmp_path / "odd.npy", np.full((40, 250), 1 / 250))
    with pytest.raises(ValueError, match="250 patches per row, not a square grid; pass --grid"):
        cli.run(cli.Args(**{**base, "attention": tmp_path / "odd.npy"}))
    bad = att.copy()
    bad[3, 0] = -1
    np.save(tmp_path / "neg.npy", bad)
    with pytest.raises(ValueError, match="negative .* first \\[3\\]"):
        cli.run(cli.Args(**{**base, "attention": tmp_path / "neg.npy"}))
    bad[3, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="NaN"):
        cli.run(cli.Args(**{**base, "attention": tmp_path / "nan.npy"}))
    with pytest.raises(ValueError, match="do not sum to 1"):
        cli.run(cli.Args(**base, require_normalised=True))
    with pytest.raises(ValueError, match="background"):
        cli.run(cli.Args(**base, objects=(0, 4)))
    with pytest.raises(ValueError, match="none of the selected object ids \\[77\\]"):
        cli.run(cli.Args(**base, objects=(77,)))
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((4, 4), int), np.zeros((5, 5), int)
    np.save(tmp_path / "ragged.npy", ragged, allow_pickle=True)
    with pytest.raises(ValueError, match="must share one \\(H, W\\)"):
        cli.run(cli.Args(**{**base, "masks": tmp_path / "ragged.npy"}))
    np.save(tmp_path / "float_masks.npy", masks.astype(np.float32))
    with pytest.raises(ValueError, match="integer instance ids"):
        cli.run(cli.Args(**{**base, "masks": tmp_path / "float_masks.npy"}))
    assert (out / "iou.json").read_text() == "previous"
