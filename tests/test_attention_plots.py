"""Figures, overlays and videos, and the three plain-array visualisation scripts end to end."""
import json
import os
import pathlib

os.environ.setdefault("MPLBACKEND", "Agg")

import imageio.v2 as imageio  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import script  # noqa: E402
from PIL import Image  # noqa: E402

from openpi.interp import attention_plots as plots  # noqa: E402


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def one_hot_heatmap(r: int, c: int) -> np.ndarray:
    hm = np.zeros((16, 16))
    hm[r, c] = 1.0
    return hm


@pytest.mark.parametrize("smooth", [False, True])
def test_overlay_hottest_region_is_planted_patch(smooth):
    r, c = 4, 11
    frame = np.zeros((224, 224, 3), np.uint8)
    out = plots.overlay(frame, one_hot_heatmap(r, c), cmap="jet", alpha=0.5, smooth=smooth)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    hot = np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255 * 0.5
    dist = np.linalg.norm(out.astype(float) - hot, axis=-1)
    ys, xs = np.nonzero(dist == dist.min())
    assert np.all((ys // 14 == r) & (xs // 14 == c))  # every hottest pixel lies inside patch (r, c)
    up = plots.upsample(one_hot_heatmap(r, c), (224, 224), smooth=smooth)
    y, x = np.unravel_index(np.argmax(up), up.shape)
    assert (y // 14, x // 14) == (r, c)
    if not smooth:  # nearest: the whole patch block carries the peak colour, nothing outside does
        block = dist[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]
        assert block.max() < 2 and (dist < 2).sum() == 14 * 14


def test_figures_have_expected_size(tmp_path):
    frames = {"base_0_rgb": np.zeros((224, 224, 3), np.uint8), "left_wrist_0_rgb": np.zeros((224, 224, 3), np.uint8)}
    heat = {k: one_hot_heatmap(2, 3) for k in frames}
    p = plots.plot_camera_overlays(frames, heat, tmp_path / "a" / "cams.png", title="t", shares={"base_0_rgb": 0.4})
    assert png_size(p) == (800, 440)
    toks = ["<bos>", "\u2581pick", "\u2581up", "\n"]
    kinds = ["template", "instruction", "instruction", "template"]
    p = plots.plot_text_attention(np.array([0.1, 0.4, 0.2, 0.05]), toks, tmp_path / "bar.png", kinds=kinds)
    assert png_size(p) == (600, 400)
    p = plots.plot_layer_token_heatmap(np.random.default_rng(0).random((3, 4)), toks, tmp_path / "lt.png")
    assert png_size(p) == (600, 300)
    p = plots.plot_combined(frames, heat, np.array([0.1, 0.4, 0.2, 0.05]), toks,
                            {"base_0_rgb": 0.5, "left_wrist_0_rgb": 0.3, "instruction": 0.2}, tmp_path / "comb.png",
                            kinds=kinds)
    assert png_size(p) == (1200, 800)
    p = plots.plot_evolution(np.arange(5), {"a": np.arange(5) / 5, "b": np.ones(5)}, tmp_path / "evo.png")
    assert png_size(p) == (800, 400)
    with pytest.raises(ValueError, match="series 'b'"):
        plots.plot_evolution(np.arange(5), {"b": np.ones(4)}, tmp_path / "bad.png")
    with pytest.raises(KeyError, match="no frame for camera"):
        plots.plot_camera_overlays({}, heat, tmp_path / "x.png")


def test_write_mp4_roundtrip(tmp_path):
    frames = [np.full((100, 230, 3), 20 * i, np.uint8) for i in range(6)]
    path = plots.write_mp4(frames, tmp_path / "v.mp4", fps=5)
    back = imageio.mimread(path)
    assert len(back) == 6
    assert back[0].shape == (112, 240, 3)  # padded up to multiples of 16
    assert abs(int(back[5][:100, :230].mean()) - 100) <= 3  # content survives compression
    with pytest.raises(ValueError, match="no frames"):
        plots.write_mp4([], tmp_path / "none.mp4")
    assert not (tmp_path / "none.mp4").exists()


# ----------------------------------------------------------------------------------------------------------------
# Scripts on plain arrays (Pi0 layout, time axis, planted attention)
# ----------------------------------------------------------------------------------------------------------------
SPANS = {
    "model": "pi0", "seq_len": 795, "prefix_len": 784, "grid": [16, 16],
    "spans": {"base_0_rgb": [0, 256], "left_wrist_0_rgb": [256, 512], "right_wrist_0_rgb": [512, 768],
              "instruction": [769, 775], "template": [[768, 769], [775, 776]], "pad": [776, 784],
              "state": [784, 785], "actions": [785, 795]},
    "camera_valid": {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False},
}
TOKENS = ["<bos>", "\u2581put", "\u2581the", "\u2581bowl", "\u2581on", "\u2581plate", "\u2581now", "\n"]


@pytest.fixture
def inputs(tmp_path):
    """(time=3, steps=2, layers=3, heads=2, queries=4, keys) with planted per-layer patterns."""
    rng = np.random.default_rng(0)
    a = rng.random((3, 2, 3, 2, 4, 795)) * 1e-3
    a[..., 512:768] = 0
    a[..., 776:784] = 0
    for t in range(3):
        a[t, ..., 16 * t + 5] += 1.0  # base camera patch (t, 5) at time t
    a[..., 256 + 9 * 16 + 9] += 0.5  # wrist patch (9, 9)
    a[:, :, 1, ..., 773] += 2.0  # layer 1 looks at the instruction token "plate"
    a /= a.sum(-1, keepdims=True)
    np.save(tmp_path / "att.npy", a.astype(np.float32))
    (tmp_path / "spans.json").write_text(json.dumps(SPANS))
    (tmp_path / "tokens.json").write_text(json.dumps(TOKENS))
    frames = rng.integers(0, 255, (4, 224, 224, 3), dtype=np.uint8)
    # The rollout's frames file: one more frame than attention entries, env steps 20..23; the attention's time
    # entries are env steps 22, 20, 21 (positions and env steps disagree on purpose).
    np.savez(tmp_path / "frames.npz", agentview=frames, wrist=frames, env_step=np.arange(20, 24, dtype=np.int32))
    np.save(tmp_path / "env_steps.npy", np.array([22, 20, 21]))
    common = dict(attention=tmp_path / "att.npy", spans=tmp_path / "spans.json",
                  axes="time,steps,layers,heads,queries,keys", env_steps=tmp_path / "env_steps.npy")
    return tmp_path, a, common


def test_visualize_attention_script(inputs):
    tmp, a, common = inputs
    mod = script("visualize_attention.py")
    mod.main(mod.Args(**common, frames=tmp / "frames.npz", out=tmp / "va", overlay_every=2))
    for name in ("overlays/s0022.png", "overlays/s0021.png", "attention.mp4", "evolution.png", "per_layer.png"):
        assert (tmp / "va" / name).is_file(), name
    assert not (tmp / "va" / "overlays" / "s0020.png").exists()  # --overlay-every 2 skips time entry 1
    assert len(imageio.mimread(tmp / "va" / "attention.mp4")) == 3
    summary = json.loads((tmp / "va" / "attention_summary.json").read_text())
    assert summary["env_steps"] == [22, 20, 21]
    rows = a.mean(axis=(1, 2, 3, 4))  # (time, keys)
    for t, entry in enumerate(summary["per_time"]):
        assert entry["fraction"]["base_0_rgb"] == pytest.approx(rows[t, :256].sum(), rel=1e-4)
        assert entry["fraction"]["instruction"] == pytest.approx(rows[t, 769:775].sum(), rel=1e-4)
        assert len(entry["per_layer"]) == 3 and len(entry["per_step"]) == 2
    layer_instr = [e["fraction"]["instruction"] for e in summary["per_time"][0]["per_layer"]]
    assert int(np.argmax(layer_instr)) == 1
    assert summary["warnings"] == []

    # one time entry, one head, one layer: no video, overlay for that entry's env step only
    mod.main(mod.Args(**{**common, "axes": "time,steps,layers,heads,queries,keys"}, frames=tmp / "frames.npz",
                      out=tmp / "one", times=(2,), layers=(0,), heads=(1,)))
    assert sorted(p.name for p in (tmp / "one" / "overlays").iterdir()) == ["s0021.png"]
    assert not (tmp / "one" / "attention.mp4").exists() and not (tmp / "one" / "per_layer.png").exists()
    # an attention env step with no frame is an error naming it; no env steps at all is refused, not guessed
    np.save(tmp / "bad_steps.npy", np.array([22, 20, 99]))
    with pytest.raises(KeyError, match=r"env step\(s\) \[99\]"):
        mod.main(mod.Args(**{**common, "env_steps": tmp / "bad_steps.npy"}, frames=tmp / "frames.npz", out=tmp / "bad"))
    with pytest.raises(ValueError, match="--env-steps"):
        mod.main(mod.Args(**{**common, "env_steps": None}, frames=tmp / "frames.npz", out=tmp / "bad"))


def test_visualize_text_attention_script(inputs):
    tmp, a, common = inputs
    mod = script("visualize_text_attention.py")
    mod.main(mod.Args(**common, tokens=tmp / "tokens.json", out=tmp / "vt"))
    res = json.loads((tmp / "vt" / "text_attention.json").read_text())
    assert res["tokens"] == TOKENS and res["key_index"] == list(range(768, 776))
    assert res["kinds"] == ["template"] + ["instruction"] * 6 + ["template"]
    assert res["top_tokens"][0]["token"] == "\u2581plate" and res["top_tokens"][0]["key_index"] == 773
    assert sum(res["weights_within_text"]) == pytest.approx(1.0)
    assert np.argmax(res["per_layer"][1]["weights"]) == 5
    assert res["mass"]["pad"] == 0
    assert png_size(tmp / "vt" / "text_attention.png")[0] >= 600
    assert (tmp / "vt" / "text_layer_token.png").is_file()
    (tmp / "short.json").write_text(json.dumps(TOKENS[:5]))
    with pytest.raises(ValueError, match="5 tokens, but the span table has 16 prompt positions"):
        mod.main(mod.Args(**common, tokens=tmp / "short.json", out=tmp / "bad"))
    assert not (tmp / "bad").exists()


def test_visualize_combined_script(inputs):
    tmp, a, common = inputs
    mod = script("visualize_combined_attention.py")
    mod.main(mod.Args(**common, tokens=tmp / "tokens.json", frames=tmp / "frames.npz", out=tmp / "vc",
                      layers=(1,)))
    for step in (20, 21, 22):
        assert png_size(tmp / "vc" / "combined" / f"s{step:04d}.png") == (1200, 800)
    summary = json.loads((tmp / "vc" / "combined_summary.json").read_text())
    assert summary["selection"]["layers"] == [1]
    assert summary["per_time"][0]["fraction"]["instruction"] > 0.4


def test_overlays_share_one_scale_and_outline_objects(tmp_path):
    """Two cameras on one colour scale: a patch at half the other camera's peak is not drawn in the top colour
    (each panel normalised to its own peak would draw both in it); the outlined object shows white pixels."""
    frame = np.zeros((224, 224, 3), np.uint8)
    strong, weak = one_hot_heatmap(2, 3), 0.5 * one_hot_heatmap(2, 3)
    top = plots.shared_vmax({"a": strong, "b": weak})
    assert top == 1.0
    hot = np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255 * 0.5
    assert np.linalg.norm(plots.overlay(frame, weak, vmax=top, smooth=False)[2 * 14 + 7, 3 * 14 + 7] - hot) > 50
    assert np.linalg.norm(plots.overlay(frame, weak, smooth=False)[2 * 14 + 7, 3 * 14 + 7] - hot) < 2
    mask = np.zeros((224, 224), bool)
    mask[100:150, 100:150] = True
    def white(path, left: bool):
        """White pixels inside the panel's image (its bounding box: pixels of the blended panel colour)."""
        img = np.asarray(Image.open(path).convert("RGB")).astype(int)
        half = img[:, :400] if left else img[:, 400:]
        panel = np.abs(half - plots.overlay(grey[:1, :1], np.zeros((1, 1)))[0, 0]).max(axis=-1) < 8
        rows, cols = np.flatnonzero(panel.any(axis=1)), np.flatnonzero(panel.any(axis=0))
        box = half[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        return int(((box > 200).all(axis=-1)).sum())

    grey = np.full((224, 224, 3), 90, np.uint8)  # panels are not white, so white pixels there are the outline
    plain = plots.plot_camera_overlays({"a": grey, "b": grey}, {"a": strong, "b": weak}, tmp_path / "p.png",
                                       outlines={"b": mask})
    lined = plots.plot_camera_overlays({"a": grey, "b": grey}, {"a": strong, "b": weak}, tmp_path / "o.png",
                                       outlines={"a": mask})
    assert png_size(lined) == (800, 440)
    assert white(lined, left=True) > white(plain, left=True) + 100  # the outline: ~4 x 30 px of white contour
    assert white(plain, left=False) > white(lined, left=False) + 100
