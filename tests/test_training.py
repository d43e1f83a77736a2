"""Training on synthetic demo frames: the loss falls, resume is bit-exact, and the checkpoint serves via
create_policy."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openpi.models import checkpoint, pi0
from openpi.models.normalize import compute_norm_stats, load_norm_stats
from openpi.models.param_shapes import init_params
from openpi.models.tokenizer import EMBEDDED_TOKENIZER, PromptTokenizer
from openpi.policies.libero_policy import LiberoTransforms
from openpi.policies.policy_config import create_policy
from openpi.training import train
from openpi.shared.rundir import RunSettingsError
from openpi.training import demos
from openpi.training.demos import write_synthetic_demos
from train_runs import STEPS, short_config, stopped_resumed_and_straight


def _cfg(demo_root, out_dir, **kw) -> train.TrainConfig:
    return short_config(demo_root, out_dir, **{"batch_size": 2, "peak_lr": 2e-3, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return stopped_resumed_and_straight(tmp_path_factory.mktemp("train"), _cfg)


def _step(root, step):
    return train.checkpoints(root).step_dir(step)


def test_resume_continues_exactly(runs):
    a, b = runs["a"], runs["b"]
    assert runs["first"]["step"] == 2 and runs["resumed"]["step"] == STEPS
    assert train.checkpoints(a).steps() == [2, STEPS]
    assert runs["resumed"]["checkpoint"] == str(_step(a, STEPS))
    cfg = train.model_config(_cfg(runs["demos"], a))
    pa = checkpoint.load_params(_step(a, STEPS), cfg)
    pb = checkpoint.load_params(_step(b, STEPS), cfg)
    p2 = checkpoint.load_params(_step(a, 2), cfg)
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), pa, p2))
    assert max(moved) > 0  # steps 3-4 changed the weights ...
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):  # ... exactly as the uninterrupted run did
        np.testing.assert_array_equal(x, y)
    with np.load(_step(a, STEPS) / "state.npz") as za, np.load(_step(b, STEPS) / "state.npz") as zb:
        assert za.files == zb.files and len(za.files) > 3  # optimizer moments, rng and step, bit for bit
        for name in za.files:
            np.testing.assert_array_equal(za[name], zb[name], err_msg=name)
    rows = train.read_metrics(a / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in train.read_metrics(b / "metrics.jsonl")],
                                                      rel=1e-4)
    meta = json.loads((_step(a, STEPS) / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["num_params"] == train.count_params(cfg) == runs["straight"]["num_params"]
    run = json.loads((a / "run.json").read_text())
    assert run["job"] == train.RUN_JOB and meta["fingerprint"] == run["fingerprint"]
    assert "out_dir" not in run["settings"]["train"] and run["settings"]["demos"]["n_demos"] == 3
    assert (a / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_reduces_the_loss_on_a_fixed_batch(runs):
    cfg = train.model_config(_cfg(runs["demos"], runs["a"]))
    stats = load_norm_stats(runs["a"] / train.NORM_STATS_REL)
    transforms = LiberoTransforms(cfg, PromptTokenizer(EMBEDDED_TOKENIZER, cfg.max_token_len), stats)
    ds = train.DemoDataset([runs["demos"]], cfg.action_horizon)
    obs, targets = train.make_batch([ds.item(i) for i in range(0, len(ds), 6)], transforms)
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.normal(size=targets.shape), jnp.float32)
    time = jnp.asarray(rng.uniform(0.05, 0.95, size=targets.shape[0]), jnp.float32)
    loss = jax.jit(lambda p: jnp.mean(pi0.compute_loss(cfg, p, obs, jnp.asarray(targets), noise=noise, time=time)))
    before = float(loss(jax.tree.map(jnp.asarray, init_params(cfg, seed=0))))
    after = float(loss(jax.tree.map(jnp.asarray, checkpoint.load_params(_step(runs["a"], STEPS), cfg))))
    assert np.isfinite(after) and after < 0.8 * before, (before, after)


def test_checkpoint_serves_through_create_policy(runs):
    ckpt = _step(runs["a"], STEPS)
    policy = create_policy(_cfg(runs["demos"], runs["a"]).policy_config, str(ckpt))
    assert policy.metadata["trained"] and policy.transforms.norm_stats is not None
    ds = train.DemoDataset([runs["demos"]], 10)
    item = ds.item(3)
    out = policy.infer({k: v for k, v in item.items() if k != "actions"}, noise=np.zeros((10, 32), np.float32))
    assert out["actions"].shape == (10, 7) and np.isfinite(out["actions"]).all()
    # Norm stats are the demos' statistics (the gripper column of the synthetic demos is exactly +-1).
    stats = policy.transforms.norm_stats
    np.testing.assert_allclose(stats["actions"].mean[6], 0.0, atol=1e-6)
    np.testing.assert_allclose(stats["state"].mean, np.concatenate([np.asarray(e.states)
                                                                    for e in ds.episodes]).mean(0), atol=1e-5)


def test_packaged_checkpoint_serves_without_optimizer_state(runs, tmp_path):
    dest = train.package_checkpoint(_step(runs["a"], STEPS), tmp_path / "pkg")
    assert sorted(p.name for p in dest.iterdir()) == ["assets", "params", "train_meta.json"]
    assert json.loads((dest / "train_meta.json").read_text())["step"] == STEPS
    cfg = _cfg(runs["demos"], runs["a"])
    for x, y in zip(jax.tree.leaves(checkpoint.load_params(dest, train.model_config(cfg))),
                    jax.tree.leaves(checkpoint.load_params(_step(runs["a"], STEPS), train.model_config(cfg)))):
        np.testing.assert_array_equal(x, y)
    assert create_policy(cfg.policy_config, str(dest)).transforms.norm_stats is not None
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        train.package_checkpoint(_step(runs["a"], STEPS), dest)
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        train.package_checkpoint(tmp_path, tmp_path / "other")


def test_action_targets_invert_the_policy_outputs():
    cfg = train.model_config(_cfg("x", "y"))
    rng = np.random.default_rng(1)
    chunk, state = rng.normal(size=(10, 7)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    stats = compute_norm_stats(rng.normal(2, 3, size=(50, 7)))
    tok = PromptTokenizer(EMBEDDED_TOKENIZER, cfg.max_token_len)
    for delta in (False, True):
        for quantile in (False, True):
            tr = LiberoTransforms(cfg, tok, {"actions": stats}, quantile_norm=quantile, delta_actions=delta)
            target = train.action_targets(chunk, state, tr)
            assert target.shape == (10, cfg.action_dim) and not target[:, 7:].any()
            np.testing.assert_allclose(tr.outputs(target, {"raw_state": state}), chunk, rtol=1e-4, atol=1e-4)


def test_chunks_repeat_the_last_action(tmp_path):
    root = write_synthetic_demos(tmp_path, episodes=1, steps=6)
    ds = train.DemoDataset([root], horizon=4)
    acts = np.asarray(ds.episodes[0].actions)
    np.testing.assert_array_equal(ds.chunk(0, 1), acts[1:5])
    np.testing.assert_array_equal(ds.chunk(0, 4), acts[[4, 5, 5, 5]])
    assert len(ds) == 6


def test_changed_schedule_is_refused_on_resume(tmp_path):
    root = write_synthetic_demos(tmp_path / "d", episodes=1, steps=3)
    out = tmp_path / "run"
    cfg = _cfg(root, out)
    ds = train.DemoDataset(cfg.demo_dirs, 10)
    train.open_run(cfg, train.run_settings(cfg, ds, EMBEDDED_TOKENIZER))
    with pytest.raises(RunSettingsError, match=r"train\.peak_lr: stored 0\.002 vs now 1\.0"):
        train.train(_cfg(root, out, peak_lr=1.0), progress=False)
    # Run options (logging, saving, paths) are not settings of the result: a resume may change them.
    moved = tmp_path / "moved_demos"
    root.rename(moved)
    assert train.open_run(_cfg(moved, out, log_every=5, save_every=7),
                          train.run_settings(cfg, train.DemoDataset([moved], 10), EMBEDDED_TOKENIZER)).resumed
    # Other demos are other data, whatever the folder is called.
    demos.write_demo(moved, demos.synthetic_episode(1, steps=3))
    with pytest.raises(RunSettingsError, match="demos.n_demos: stored 1 vs now 2"):
        train.train(_cfg(moved, out), progress=False)
    (out / "run.json").unlink()
    (out / "train_config.json").write_text("{}")
    with pytest.raises(RunSettingsError, match="older layout"):
        train.train(_cfg(moved, out), progress=False)
    (tmp_path / "empty" / "demos").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete demos"):
        train.train(_cfg(tmp_path / "empty", tmp_path / "run2"), progress=False)


def test_strided_demos_sample_only_steps_with_frames(tmp_path):
    ep = demos.synthetic_episode(0, steps=7)
    full_agent = ep.agentview.copy()
    ep.meta["frame_stride"] = 3
    ep.agentview, ep.wrist = ep.agentview[::3], ep.wrist[::3]
    demos.write_demo(tmp_path, ep)
    ds = train.DemoDataset([tmp_path], horizon=4)
    assert len(ds) == 3 and ds.index[:, 1].tolist() == [0, 3, 6]
    item = ds.item(1)  # env step 3: its own frame, state and the actions from step 3 on
    np.testing.assert_array_equal(item["observation/image"], full_agent[3])
    np.testing.assert_array_equal(item["observation/state"], ep.states[3])
    np.testing.assert_array_equal(item["actions"], ep.actions[[3, 4, 5, 6]])


def test_resume_stays_exact_with_augmentation(runs, tmp_path):
    """Augmentation draws from the step's rng: a run stopped at step 2 and resumed ends bit-identical to one run
    straight through, and it really augments (it ends elsewhere than the same run without augmentation). A run
    directory fingerprinted without it is refused when it is switched on (naming the setting)."""
    a, b = tmp_path / "aug_a", tmp_path / "aug_b"
    train.train(_cfg(runs["demos"], a, augment=True), progress=False, stop_at=2)
    train.train(_cfg(runs["demos"], a, augment=True), progress=False)
    train.train(_cfg(runs["demos"], b, augment=True), progress=False)
    cfg = train.model_config(_cfg(runs["demos"], a))
    pa, pb = (checkpoint.load_params(_step(d, STEPS), cfg) for d in (a, b))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    plain = checkpoint.load_params(_step(runs["b"], STEPS), cfg)
    assert max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(plain))) > 1e-6
    with pytest.raises(RunSettingsError, match="augment: stored False vs now True"):
        train.train(_cfg(runs["demos"], runs["b"], augment=True), progress=False)


def test_pi0_fast_trains_resumes_exactly_and_serves(tmp_path):
    """Pi0-FAST through the same trainer: the target chunk becomes FAST tokens, a killed run resumes bit-exactly,
    and the checkpoint (with its FAST tokenizer folder) serves through create_policy."""
    from openpi.models.fast_tokenizer import FASTTokenizer

    demo_root = write_synthetic_demos(tmp_path / "demos", episodes=3, steps=12)
    chunks, _ = train.fast_training_chunks([demo_root], 10)  # fitted on the demos, as for the embedded one
    # scale 2: the synthetic chunks are noise-like, so at the default scale their token count overflows 112
    FASTTokenizer.train(chunks, vocab_size=300, scale=2.0).save(tmp_path / "fast")
    kw = dict(policy_config="pi0_fast_tiny_spatial", fast_tokenizer=str(tmp_path / "fast"))
    train.train(_cfg(demo_root, tmp_path / "a", **kw), progress=False, stop_at=2)
    resumed = train.train(_cfg(demo_root, tmp_path / "a", **kw), progress=False)
    straight = train.train(_cfg(demo_root, tmp_path / "b", **kw), progress=False)
    assert np.isfinite(resumed["final_loss"]) and resumed["final_loss"] == straight["final_loss"]
    cfg = train.model_config(_cfg(demo_root, tmp_path / "a", **kw))
    for x, y in zip(jax.tree.leaves(checkpoint.load_params(_step(tmp_path / "a", STEPS), cfg)),
                    jax.tree.leaves(checkpoint.load_params(_step(tmp_path / "b", STEPS), cfg))):
        np.testing.assert_array_equal(x, y)
    ckpt = _step(tmp_path / "a", STEPS)
    assert (ckpt / "fast_tokenizer" / "tokenizer.json").read_bytes() == (tmp_path / "fast" / "tokenizer.json").read_bytes()
    policy = create_policy("pi0_fast_tiny_spatial", str(ckpt))
    assert policy.metadata["fast_tokenizer"] == str(ckpt / "fast_tokenizer")
    item = train.DemoDataset([demo_root], 10).item(3)
    out = policy.infer({k: v for k, v in item.items() if k != "actions"})
    assert out["actions"].shape == (10, 7) and set(out["fast_decode"]) >= {"ok", "reason", "fitted"}
