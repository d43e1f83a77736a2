"""Span arithmetic, heatmaps, modality masses and named-axis selection on hand-built span tables."""
import json

import numpy as np
import pytest

from openpi.interp import attention as A

P = 256


def pi0_table() -> dict:
    """Pi0 LIBERO-like layout with max_token_len 16: BOS + 6 instruction tokens + newline + 8 pad."""
    return {
        "model": "pi0", "seq_len": 795, "prefix_len": 784, "grid": [16, 16],
        "spans": {"base_0_rgb": [0, 256], "left_wrist_0_rgb": [256, 512], "right_wrist_0_rgb": [512, 768],
                  "instruction": [769, 775], "template": [[768, 769], [775, 776]], "pad": [776, 784],
                  "state": [784, 785], "actions": [785, 795]},
        "camera_valid": {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False},
    }


def pi05_table() -> dict:
    """Pi0.5 with a discretised-state prompt: BOS 'Task' ':' | 5 instruction words | ', State: ...;\\nAction: '."""
    return {
        "model": "pi05", "seq_len": 978, "prefix_len": 968, "grid": [16, 16],
        "spans": {"base_0_rgb": [0, 256], "left_wrist_0_rgb": [256, 512], "right_wrist_0_rgb": [512, 768],
                  "template": [[768, 771], [776, 800]], "instruction": [771, 776], "pad": [800, 968],
                  "state": [968, 968], "actions": [968, 978]},
        "camera_valid": {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False},
    }


def spread(row: np.ndarray, idx: np.ndarray, mass: float) -> None:
    row[idx] += mass / idx.size


def test_pi0_span_arithmetic_and_masses():
    t = A.SpanTable.from_dict(pi0_table())
    assert t.prefix_len == 3 * 256 + 16 == 784
    assert t.cameras == ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    assert t.valid_cameras == ("base_0_rgb", "left_wrist_0_rgb")
    assert t.prompt_indices().tolist() == list(range(768, 784))
    assert t.length("state") == 1 and t.length("actions") == 10
    assert t.seq_len - t.prefix_len == t.length("state") + t.length("actions")
    assert t.indices("template").tolist() == [768, 775]
    assert t.unassigned_indices().size == 0

    row = np.zeros(t.seq_len)
    planted = {"base_0_rgb": 0.3, "left_wrist_0_rgb": 0.2, "instruction": 0.1, "template": 0.05,
               "state": 0.15, "actions": 0.2}
    for name, mass in planted.items():
        spread(row, t.indices(name), mass)
    m = A.modality_masses(row, t)
    for name, mass in planted.items():
        assert m[name] == pytest.approx(mass)
    assert m["pad"] == 0 and m["right_wrist_0_rgb"] == 0
    assert m["visual"] == pytest.approx(0.5)
    assert A.visual_linguistic_ratio(m) == pytest.approx(5.0)
    assert A.sanity_warnings(m, t) == []


def test_pi05_layout_no_state_instruction_vs_template():
    t = A.SpanTable.from_dict(pi05_table())
    assert t.prefix_len == 3 * 256 + 200
    assert t.length("state") == 0 and t.indices("state").size == 0
    assert t.length("actions") == t.seq_len - t.prefix_len == 10
    kinds = A.token_kinds(t)
    assert kinds[:3] == ["template"] * 3 and kinds[3:8] == ["instruction"] * 5
    assert kinds[8:32] == ["template"] * 24 and set(kinds[32:]) == {"pad"}

    row = np.zeros(t.seq_len)
    spread(row, t.indices("instruction"), 0.25)
    spread(row, t.indices("template"), 0.15)  # discretised state digits count as template, not language
    spread(row, t.indices("base_0_rgb"), 0.6)
    m = A.modality_masses(row, t)
    assert m["instruction"] == pytest.approx(0.25) and m["template"] == pytest.approx(0.15)
    assert m["state"] == 0
    assert A.visual_linguistic_ratio(m) == pytest.approx(0.6 / 0.25)

    toks = [f"w{i}" for i in range(32)]  # one per non-pad prompt position
    aligned = A.align_tokens(toks, t)
    assert len(aligned) == 200 and aligned[:32] == toks and set(aligned[32:]) == {"<pad>"}
    with pytest.raises(ValueError, match="prompt positions"):
        A.align_tokens(toks[:-1], t)


@pytest.mark.parametrize("make", [pi0_table, pi05_table])
def test_modality_fractions_sum_to_one(make):
    table = make()
    table["spans"]["actions"] = [table["spans"]["actions"][0], table["spans"]["actions"][1] - 2]  # 2 unclaimed keys
    t = A.SpanTable.from_dict(table)
    assert t.unassigned_indices().size == 2
    rows = np.random.default_rng(0).random((3, 4, t.seq_len))
    frac = A.modality_fractions(A.modality_masses(rows, t))
    total = sum(frac[n] for n in A.partition_names(t))
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    assert frac["unassigned"].min() > 0
    # visual = the valid cameras only
    np.testing.assert_allclose(frac["visual"], frac["base_0_rgb"] + frac["left_wrist_0_rgb"])


@pytest.mark.parametrize("r,c", [(0, 0), (3, 5), (15, 2), (7, 15)])
def test_heatmap_row_major(r, c):
    t = A.SpanTable.from_dict(pi0_table())
    row = np.zeros(t.seq_len)
    row[256 + r * 16 + c] = 1.0  # wrist camera patch (r, c)
    hm = A.camera_heatmap(row, t, "left_wrist_0_rgb")
    assert hm.shape == (16, 16)
    assert hm[r, c] == 1.0 and hm.sum() == 1.0
    assert A.camera_heatmap(row, t, "base_0_rgb").sum() == 0
    batch = np.stack([row, row * 0.5])
    assert A.camera_heatmap(batch, t, "left_wrist_0_rgb")[1, r, c] == 0.5


def test_span_table_errors():
    bad = pi0_table()
    bad["spans"]["instruction"] = [766, 775]
    with pytest.raises(ValueError, match="overlap"):
        A.SpanTable.from_dict(bad)
    bad = pi0_table()
    bad["spans"]["base_0_rgb"] = [0, 255]
    with pytest.raises(ValueError, match="holds 255 tokens, expected grid 16x16 = 256"):
        A.SpanTable.from_dict(bad)
    bad = pi0_table()
    bad["spans"]["actions"] = [785, 800]
    with pytest.raises(ValueError, match="seq_len=795"):
        A.SpanTable.from_dict(bad)
    bad = pi0_table()
    bad["spans"]["state"] = "784:785"
    with pytest.raises(ValueError, match="'state' = '784:785' is not"):
        A.SpanTable.from_dict(bad)
    bad = pi0_table()
    del bad["seq_len"]
    with pytest.raises(ValueError, match="missing key 'seq_len'"):
        A.SpanTable.from_dict(bad)
    t = A.SpanTable.from_dict(pi0_table())
    with pytest.raises(ValueError, match="796 keys"):
        A.modality_masses(np.zeros(796), t)
    with pytest.raises(KeyError, match="not a camera"):
        A.camera_probs(np.zeros(795), t, "instruction")


def test_sanity_warnings_flag_pad_and_masked_camera():
    t = A.SpanTable.from_dict(pi0_table())
    row = np.zeros(t.seq_len)
    spread(row, t.indices("base_0_rgb"), 0.9)
    spread(row, t.indices("pad"), 0.05)
    spread(row, t.indices("right_wrist_0_rgb"), 0.05)
    warnings = A.sanity_warnings(A.modality_masses(row, t), t)
    assert any("'pad'" in w for w in warnings)
    assert any("'right_wrist_0_rgb'" in w for w in warnings)
    row2 = np.zeros(t.seq_len)
    row2[:10] = 0.05  # sums to 0.5
    assert any("not 1" in w for w in A.sanity_warnings(A.modality_masses(row2, t), t))
    m = A.modality_masses(row2, t)
    assert np.isinf(A.visual_linguistic_ratio(m))


def test_named_axis_selection_and_mean():
    rng = np.random.default_rng(1)
    data = rng.random((3, 4, 2, 5, 7))  # steps, layers, heads, queries, keys
    att = A.AttentionArray.with_all_axes(data, A.CANONICAL_AXES)
    assert att.axes == A.KNOWN_AXES and att.data.shape == (1, 3, 4, 2, 5, 7)
    sel = att.select(steps=[-1], layers=[1, 3], heads=[0], queries=None)
    np.testing.assert_array_equal(sel.data[0], data[[-1]][:, [1, 3]][:, :, [0]])
    red = sel.mean("steps", "heads", "queries")
    assert red.axes == ("time", "layers", "keys")
    np.testing.assert_allclose(red.data[0], data[-1][[1, 3]][:, 0].mean(axis=1))

    # another axis order: (layers, heads, keys) with time first
    other = A.AttentionArray.with_all_axes(rng.random((6, 2, 8, 7)), ("time", "heads", "layers", "keys"))
    assert other.data.shape == (6, 1, 8, 2, 1, 7)
    with pytest.raises(IndexError, match="layers indices \\[9\\]"):
        att.select(layers=[9])
    with pytest.raises(ValueError, match="last axis must be 'keys'"):
        A.AttentionArray.with_all_axes(data, ("keys", "steps", "layers", "heads", "queries"))
    with pytest.raises(ValueError, match="unknown axis"):
        A.AttentionArray.with_all_axes(data, ("steps", "layerz", "heads", "queries", "keys"))
    with pytest.raises(ValueError, match="destroy"):
        att.mean("keys")


def test_attention_inputs_load_checks(tmp_path):
    t = pi0_table()
    (tmp_path / "spans.json").write_text(json.dumps(t))
    np.save(tmp_path / "att.npy", np.full((2, 3, 1, 4, 795), 1 / 795, dtype=np.float32))
    ok = A.AttentionInputs(attention=tmp_path / "att.npy", spans=tmp_path / "spans.json", layers=(2,))
    att, table = ok.load()
    assert att.data.shape == (1, 2, 1, 1, 4, 795) and table.seq_len == 795
    assert ok.labels(att)["layers"] == [2]
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 1, 4, 790), dtype=np.float32))
    with pytest.raises(ValueError, match="keys axis has length 790 .* seq_len 795"):
        A.AttentionInputs(attention=tmp_path / "bad.npy", spans=tmp_path / "spans.json").load()
    with pytest.raises(ValueError, match="5 dims.* names 4"):
        A.AttentionInputs(attention=tmp_path / "att.npy", spans=tmp_path / "spans.json",
                          axes="layers,heads,queries,keys").load()
    neg = np.full((2, 3, 1, 4, 795), 1 / 795, dtype=np.float32)
    neg[1, 2, 0, 3, 100] = -0.5
    np.save(tmp_path / "neg.npy", neg)
    with pytest.raises(ValueError, match="negative values"):
        A.AttentionInputs(attention=tmp_path / "neg.npy", spans=tmp_path / "spans.json").load()
    A.AttentionInputs(attention=tmp_path / "neg.npy", spans=tmp_path / "spans.json", layers=(0, 1)).load()
    neg[0, 0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", neg)
    with pytest.raises(ValueError, match="NaN"):
        A.AttentionInputs(attention=tmp_path / "nan.npy", spans=tmp_path / "spans.json").load()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        A.load_span_table(tmp_path / "nope.json")


def test_select_frames_and_json(tmp_path):
    """Frames are joined with attention time entries on env step, never on position (planted: the frames file
    holds env steps 10..14 with pixel value = env step; the attention's entries are env steps 14, 10, 12)."""
    frames = {"base_0_rgb": np.arange(10, 15)[:, None, None, None] * np.ones((5, 2, 2, 3), np.uint8),
              "left_wrist_0_rgb": np.arange(10, 15)[:, None, None, None] * np.ones((5, 2, 2, 3), np.uint8)}
    steps = np.arange(10, 15)
    got, idx = A.select_frames(frames, steps, [14, 10, 12])
    assert idx == [14, 10, 12]
    for cam in frames:
        assert got[cam][:, 0, 0, 0].tolist() == [14, 10, 12]  # by position it would have been 10, 11, 12
    with pytest.raises(KeyError, match=r"no frame for env step\(s\) \[99\].*10\.\.14"):
        A.select_frames(frames, steps, [10, 99])
    with pytest.raises(ValueError, match="--env-steps"):
        A.select_frames(frames, steps, None)  # five frames, attention env step unknown: no guessing
    with pytest.raises(ValueError, match="no 'env_step' array"):
        A.select_frames(frames, None, [10, 11])
    one = {"base_0_rgb": frames["base_0_rgb"][:1]}
    assert A.select_frames(one, None, None)[1] == [None]  # a lone frame for a lone attention row is unambiguous
    assert A.select_frames(one, np.array([10]), None)[1] == [10]
    np.savez(tmp_path / "f.npz", agentview=frames["base_0_rgb"], env_step=steps.astype(np.int32))
    assert A.load_frame_env_steps(tmp_path / "f.npz").tolist() == list(range(10, 15))
    np.savez(tmp_path / "keys.npz", env_step=np.array([14, 10]), episode=np.array([0, 0]))
    assert A.load_env_steps(tmp_path / "keys.npz").tolist() == [14, 10]
    A.write_json(tmp_path / "x.json", {"a": np.float32(np.nan), "b": np.arange(2), "c": np.inf})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [0, 1], "c": None}
