"""The SAE benchmark fails with a clear message when its reference trainer is not installed."""

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


def test_missing_reference_trainer_exits_with_install_hint(monkeypatch):
    bench = _load_bench()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dictionary_learning" else real(name, *a))
    monkeypatch.delitem(sys.modules, "dictionary_learning", raising=False)
    with pytest.raises(SystemExit) as exc:
        bench.import_reference()
    msg = str(exc.value)
    assert "not installed" in msg and "pip install torch==2.13.0" in msg and "dictionary-learning" in msg


def test_missing_torch_exits_with_install_hint(monkeypatch):
    bench = _load_bench()
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ModuleNotFoundError
    with pytest.raises(SystemExit, match="needs torch, which is not installed"):
        bench.import_reference()
