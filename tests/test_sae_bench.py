"""The SAE benchmark runs our trainer everywhere and skips each missing reference with a one-line install hint."""

import importlib.util
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_sae", REPO / "benchmarks" / "bench_sae.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_sae"] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def test_missing_references_are_skipped_with_install_hint(monkeypatch, capsys):
    bench = _load_bench()
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ModuleNotFoundError
    out = bench.main(bench.Args(d=16, num_latents=64, k=4, batch_size=32, steps=12, rows=1500))
    assert out["references"] == {}
    assert set(out["skipped"]) == {"dictionary_learning", "sparsify", "sae_lens"}
    assert all("setup_bench_env.sh" in why for why in out["skipped"].values())
    assert out["ours"]["step_ms"] > 0 and 0 <= out["ours"]["fvu"] < 1.5 and out["floor_ms"] > 0
    printed = capsys.readouterr().out
    assert printed.count("skipped ") == 3


def test_unknown_reference_names_the_choices():
    bench = _load_bench()
    with pytest.raises(SystemExit, match="unknown reference.*sae_lens"):
        bench.main(bench.Args(references=("saelens",)))
