"""The one run directory: settings check-or-write, fingerprint, atomic folders and checkpoints."""
import dataclasses
import json

import numpy as np
import pytest

from openpi.shared.rundir import (CheckpointDir, RunDir, RunSettingsError, atomic_dir, differences, fingerprint,
                                  run_option, settings_of)


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    arch: str = "topk"


@dataclasses.dataclass
class Cfg:
    steps: int = 100
    inner: Inner = dataclasses.field(default_factory=Inner)
    shard_index: int = run_option(0)
    progress: bool = run_option(True)


def test_fingerprint_covers_every_setting_but_not_run_options():
    base = fingerprint(Cfg())
    assert fingerprint(Cfg(shard_index=3, progress=False)) == base
    assert fingerprint(Cfg(steps=101)) != base
    assert fingerprint(Cfg(inner=Inner(lr=2e-3))) != base
    assert "shard_index" not in settings_of(Cfg()) and settings_of(Cfg())["inner"]["arch"] == "topk"


def test_run_dir_resumes_same_settings_and_refuses_others_naming_each(tmp_path):
    first = RunDir(tmp_path / "run", "sae-train", Cfg())
    assert not first.resumed and json.loads(first.run_path.read_text())["job"] == "sae-train"
    again = RunDir(tmp_path / "run", "sae-train", Cfg(shard_index=1))
    assert again.resumed
    with pytest.raises(RunSettingsError, match=r"inner\.lr: stored 0\.001 vs now 0\.002.*steps: stored 100 vs now 7"):
        RunDir(tmp_path / "run", "sae-train", Cfg(steps=7, inner=Inner(lr=2e-3)))
    with pytest.raises(RunSettingsError, match="belongs to a 'sae-train' run"):
        RunDir(tmp_path / "run", "probes", Cfg())
    redo = RunDir(tmp_path / "run", "sae-train", Cfg(steps=7), overwrite=True)
    assert not redo.resumed and RunDir(tmp_path / "run", "sae-train", Cfg(steps=7)).resumed


def test_differences_lists_added_and_removed_keys():
    assert differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"d": 3}}) == [
        "b.c: 2 then vs absent now", "b.d: absent then vs 3 now"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as d:
        (d / "X.npy").write_text("old")
        (d / "keys.npz").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "X.npy").write_text("new")
            raise RuntimeError("input check failed half way")
    assert sorted(p.name for p in target.iterdir()) == ["X.npy", "keys.npz"]
    assert (target / "X.npy").read_text() == "old"  # nothing mixed in
    with atomic_dir(target) as d:
        (d / "X.npy").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["X.npy"] and (target / "X.npy").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporaries left


def test_checkpoints_round_trip_bit_exact_prune_and_refuse_mismatch(tmp_path):
    ck = CheckpointDir(tmp_path / "ck", keep_last=2)
    state = {"w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "step": np.int64(5)}
    for step in (10, 20, 30):
        ck.save(step, state, {"loss": 0.5}, write_extra=lambda d: (d / "params.txt").write_text("servable"))
    assert ck.steps() == [20, 30] and (ck.step_dir(30) / "params.txt").is_file()
    restored, meta = ck.restore(state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert restored["w"].dtype == np.float32 and meta["step"] == 30 and meta["loss"] == 0.5
    with pytest.raises(ValueError, match=r"array 1 is float32\(3, 4\).*float32\(2, 4\)"):
        ck.restore({"w": np.zeros((2, 4), np.float32), "step": np.int64(0)})
    with pytest.raises(FileExistsError):
        ck.save(30, state, {})
    (ck.root / ".tmp-00000040-dead").mkdir()  # a killed save: ignored
    assert ck.latest() == 30


def test_failed_checkpoint_save_leaves_no_checkpoint(tmp_path):
    ck = CheckpointDir(tmp_path / "ck")

    def boom(d):
        raise OSError("disk full")

    with pytest.raises(OSError):
        ck.save(1, {"a": np.zeros(2)}, {}, write_extra=boom)
    assert ck.steps() == [] and list(ck.root.iterdir()) == []
