"""SAE training: planted-dictionary recovery with the CLI defaults, deterministic resume, the held-out split by
episode (planted episode structure that a row-block split hides), input errors."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from openpi.interp.sae import io as sae_io
from openpi.interp.sae import synthetic
from openpi.interp.sae import train as sae_train
from openpi.shared.rundir import CheckpointDir, RunSettingsError

from openpi.interp.sae import train_cli as train_save

REPO = pathlib.Path(__file__).resolve().parents[1]


def _args(x_path, out, **kw):
    if "keys" not in kw:
        kw.setdefault("split", "rows")  # these synthetic matrices have no episodes: the row split, said explicitly
    cfg = sae_train.TrainConfig(**{k: v for k, v in kw.items() if k in sae_train.TrainConfig.__dataclass_fields__})
    rest = {k: v for k, v in kw.items() if k not in sae_train.TrainConfig.__dataclass_fields__}
    return train_save.Args(activations=x_path, out=out, train=cfg, **rest)


def test_planted_dictionary_recovered_with_defaults(tmp_path):
    x, atoms = synthetic.planted_dictionary(d=48, n_atoms=96, rows=20000, active=4, seed=0)
    np.save(tmp_path / "x.npy", x)
    # Exactly the minimal interface: --activations --arch --k --num-latents --out, everything else default.
    res = train_save.run(_args(tmp_path / "x.npy", tmp_path / "sae", arch="topk", k=4, num_latents=128))
    sae = sae_io.load_sae(tmp_path / "sae")
    w = np.asarray(sae.params["W_dec"])
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    best = (atoms @ w.T).max(axis=1)
    assert (best > 0.9).mean() >= 0.9, f"only {(best > 0.9).mean():.2f} of atoms recovered"
    m = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert m["held_out"]["fvu"] < 0.15
    assert m["held_out"]["l0"] == pytest.approx(4.0)
    assert m["held_out"]["n_rows"] > 0 and m["n_train_rows"] + m["held_out"]["n_rows"] == 20000
    assert m["split"]["kind"] == m["held_out"]["split"]["kind"] == m["baselines"]["split"] == "rows"
    assert "optimistic" in m["split"]["warning"]
    # Baselines on the same rows: the training mean explains nothing, PCA with k=4 components far less than the
    # SAE with 4 active latents (96 atoms in 48 dims are not a 4-dim subspace); the intervals say so.
    b = m["baselines"]
    assert b["train_mean"]["fvu"] == pytest.approx(1.0, abs=0.02)
    assert b["pca_same_l0"]["n_components"] == 4 and b["pca_same_l0"]["fvu"] > m["held_out"]["fvu"] + 0.3
    assert b["pca_minus_sae"]["ci_low"] > 0
    assert m["held_out"]["fvu_ci_low"] <= m["held_out"]["fvu"] <= m["held_out"]["fvu_ci_high"]
    assert m["steps"] == res.metrics["steps"] >= 1000
    assert (tmp_path / "sae" / "training_curves.png").stat().st_size > 1000
    assert not (tmp_path / "sae" / sae_train.CHECKPOINT_DIR).exists()
    # Input scaling: E||s x||^2 = d on training rows.
    assert np.mean(np.sum((x * sae.spec.input_scale) ** 2, axis=1)) == pytest.approx(48, rel=0.05)


def test_resume_equals_uninterrupted_and_rerun_is_idempotent(tmp_path):
    x, _ = synthetic.planted_dictionary(d=16, n_atoms=24, rows=3000, active=3, seed=1)
    np.save(tmp_path / "x.npy", x)
    kw = dict(arch="batchtopk", k=3, num_latents=32, steps=60, batch_size=256, checkpoint_every=25, eval_every=20)
    assert train_save.run(_args(tmp_path / "x.npy", tmp_path / "a", stop_after_steps=37, **kw)) is None
    ckpts = CheckpointDir(tmp_path / "a" / sae_train.CHECKPOINT_DIR)
    ck_state, ck = ckpts.restore(sae_train.init_state(
        sae_train.resolve(sae_train.TrainConfig(**{k: v for k, v in kw.items()}), 16, 1), "batchtopk", 1.0, np.zeros(16, np.float32), 0))
    assert ck["step"] == 37 == int(ck_state["step"]) and not (tmp_path / "a" / "cfg.json").exists()
    assert ckpts.steps() == [37] and sorted(p.name for p in ckpts.step_dir(37).iterdir()) == ["meta.json", "state.npz"]
    train_save.run(_args(tmp_path / "x.npy", tmp_path / "a", **kw))
    train_save.run(_args(tmp_path / "x.npy", tmp_path / "b", **kw))
    wa = load_file(str(tmp_path / "a" / sae_io.WEIGHTS_NAME))
    wb = load_file(str(tmp_path / "b" / sae_io.WEIGHTS_NAME))
    assert set(wa) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["held_out"] == mb["held_out"] and ma["threshold"] == mb["threshold"] > 0
    curves_a = json.loads((tmp_path / "a" / "curves.json").read_text())
    curves_b = json.loads((tmp_path / "b" / "curves.json").read_text())
    assert curves_a == curves_b
    # Rerunning a finished command leaves the result untouched; a different config is refused.
    mtime = (tmp_path / "a" / sae_io.WEIGHTS_NAME).stat().st_mtime_ns
    train_save.run(_args(tmp_path / "x.npy", tmp_path / "a", **kw))
    assert (tmp_path / "a" / sae_io.WEIGHTS_NAME).stat().st_mtime_ns == mtime
    with pytest.raises(RunSettingsError, match=r"train\.k: stored 3 vs now 4"):
        train_save.run(_args(tmp_path / "x.npy", tmp_path / "a", **{**kw, "k": 4}))
    assert (tmp_path / "a" / sae_io.WEIGHTS_NAME).stat().st_mtime_ns == mtime


def test_bad_inputs_give_clear_errors(tmp_path):
    x, _ = synthetic.planted_dictionary(d=8, n_atoms=8, rows=600, active=2, seed=2)
    bad = x.copy()
    bad[123, 4] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match=r"nan\.npy: row 123 contains NaN or Inf"):
        train_save.run(_args(tmp_path / "nan.npy", tmp_path / "o1", k=2, num_latents=16))
    bad[123, 4] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    with pytest.raises(ValueError, match="row 123"):
        train_save.run(_args(tmp_path / "inf.npy", tmp_path / "o2", k=2, num_latents=16))
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ValueError, match="k=20 must be between 1 and the dictionary size num_latents=16"):
        train_save.run(_args(tmp_path / "x.npy", tmp_path / "o3", k=20, num_latents=16))
    np.save(tmp_path / "x3d.npy", x.reshape(600, 2, 4))
    with pytest.raises(ValueError, match="must be 2-D"):
        train_save.run(_args(tmp_path / "x3d.npy", tmp_path / "o4", k=2, num_latents=16))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        train_save.run(_args(tmp_path / "missing.npy", tmp_path / "o5", k=2, num_latents=16))
    # Selection on key columns: an empty selection is an error naming the filter.
    keys = {"span": np.array(["actions"] * 600), "episode": np.arange(600) // 50}
    np.savez(tmp_path / "keys.npz", **keys)
    with pytest.raises(ValueError, match="empty selection.*'span': \\['image'\\]"):
        train_save.run(_args(tmp_path / "x.npy", tmp_path / "o6", k=2, num_latents=16, keys=tmp_path / "keys.npz", select=("span=image",)))
    np.savez(tmp_path / "short.npz", span=np.array(["a"] * 10))
    with pytest.raises(ValueError, match="has 10 rows, expected 600"):
        train_save.run(_args(tmp_path / "x.npy", tmp_path / "o7", k=2, num_latents=16, keys=tmp_path / "short.npz"))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


def test_cli_reports_error_and_exit_status(tmp_path):
    x, _ = synthetic.planted_dictionary(d=8, n_atoms=8, rows=300, active=2, seed=3)
    np.save(tmp_path / "x.npy", x)
    p = subprocess.run([sys.executable, str(REPO / "train_save.py"), "--activations", str(tmp_path / "x.npy"), "--split", "rows", "--k", "40", "--num-latents", "16", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "train_save.py: error: k=40 must be between 1 and the dictionary size num_latents=16" in p.stderr


def test_holdout_split_is_grouped_and_seeded():
    groups = np.repeat(np.arange(20), 7)
    tr, ev = sae_train.holdout_split(groups.size, 0.2, 128, 0, groups)
    assert set(groups[tr]).isdisjoint(groups[ev]) and len(set(groups[ev])) == 4
    tr2, ev2 = sae_train.holdout_split(groups.size, 0.2, 128, 0, groups)
    np.testing.assert_array_equal(ev, ev2)
    tr, ev = sae_train.holdout_split(1000, 0.1, 100, 0)
    assert ev.size == 100 and np.all(np.diff(ev) == 1)  # one contiguous block of 100 rows


def test_batch_source_epochs_are_permutations_and_restartable(tmp_path):
    x = np.arange(2000, dtype=np.float32).reshape(1000, 2)
    np.save(tmp_path / "x.npy", x)
    cfg = sae_train.TrainConfig(batch_size=60, holdout_frac=0.1, holdout_block=50, split="rows")
    src = sae_train.npy_source(tmp_path / "x.npy", cfg)
    assert src.n_train == 900 and src.eval_rows.size == 100
    it = src.iter_train(0)
    batches = [next(it) for _ in range(30)]  # two epochs of 15 batches
    for epoch in range(2):
        rows = np.concatenate(batches[15 * epoch : 15 * (epoch + 1)])[:, 0] / 2
        np.testing.assert_array_equal(np.sort(rows), src.train_rows)
    assert not np.array_equal(np.concatenate(batches[:15]), np.concatenate(batches[15:]))
    np.testing.assert_array_equal(next(src.iter_train(17)), batches[17])  # restart at any step
    ev = np.concatenate(list(src.iter_eval(33)))[:, 0] / 2
    np.testing.assert_array_equal(ev, src.eval_rows)
    assert np.intersect1d(ev, src.train_rows).size == 0


def _episode_structured(tmp_path, n_episodes=40, rows=160, d=32, seed=0):
    """Activations dominated by a per-episode offset (each episode its own random direction, norm 4) plus small
    shared structure: rows of one episode are near-duplicates, as the tokens, denoising steps and queries of one
    LIBERO episode are. Rows are stored episode by episode, as an export writes them."""
    rng = np.random.default_rng(seed)
    shared, _ = synthetic.planted_dictionary(d=d, n_atoms=48, rows=n_episodes * rows, active=2, seed=seed + 1)
    offsets = rng.standard_normal((n_episodes, d))
    offsets *= 4.0 / np.linalg.norm(offsets, axis=1, keepdims=True)
    ep = np.repeat(np.arange(n_episodes), rows)
    x = (offsets[ep] + 0.3 * shared).astype(np.float32)
    keys = {"run_id": np.array(["r"] * ep.size), "suite": np.array(["libero_spatial"] * ep.size),
            "task_id": ep % 2, "episode": ep, "env_step": np.tile(np.arange(rows), n_episodes)}
    np.save(tmp_path / "X.npy", x)
    np.savez(tmp_path / "keys.npz", **keys)
    return tmp_path / "X.npy", tmp_path / "keys.npz"


def test_episode_split_is_the_default_and_row_blocks_leak(tmp_path):
    """Planted: with strong per-episode structure, held-out row blocks share their episode with training rows, so
    the SAE reconstructs them from memorised episode offsets; whole held-out episodes expose that it does not
    generalise to new episodes. The default (keys given) must be the episode split, labelled in metrics.json."""
    x, keys = _episode_structured(tmp_path)
    kw = dict(arch="topk", k=4, num_latents=64, steps=800, batch_size=256, holdout_frac=0.2, holdout_block=32)
    ep = train_save.run(_args(x, tmp_path / "ep", keys=keys, **kw)).metrics
    rows = train_save.run(_args(x, tmp_path / "rows", keys=keys, split="rows", **kw)).metrics
    assert ep["split"]["kind"] == "episodes" and ep["held_out"]["split"]["kind"] == "episodes"
    assert ep["split"]["n_eval_episodes"] == 8 and ep["split"]["n_train_episodes"] == 32
    assert len(ep["split"]["eval_episodes"]) == 8 and ep["split"]["eval_episodes"][0].startswith("r__libero_spatial__task")
    assert rows["split"]["kind"] == "rows" and rows["split"]["n_eval_episodes"] is None
    fvu_ep, fvu_rows = ep["held_out"]["fvu"], rows["held_out"]["fvu"]
    print(f"held-out FVU: whole episodes {fvu_ep:.3f}, row blocks {fvu_rows:.3f}")
    assert fvu_rows < 0.15 and fvu_ep > fvu_rows + 0.3, (fvu_ep, fvu_rows)
    # The episode interval resamples the 8 held-out episodes and lies above the row-block estimate.
    assert ep["held_out"]["fvu_ci_low"] > fvu_rows and "8 episodes" in ep["held_out"]["interval"]
    # Without keys the episode split cannot be made: an error that says how to fix it, never a silent row split.
    with pytest.raises(ValueError, match="--keys KEYS.npz.*--split rows"):
        train_save.run(train_save.Args(activations=x, out=tmp_path / "nokeys", train=sae_train.TrainConfig(**kw)))
    assert not (tmp_path / "nokeys").exists()
