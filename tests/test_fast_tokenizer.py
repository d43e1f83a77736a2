"""FAST action tokenizer (DCT + BPE), openpi's Pi0-FAST token layout, and the tokenizer training script."""
import json
import pathlib
import runpy
import types

import numpy as np
import pytest
from scipy.fft import dct, idct

from model_fixtures import FAST_FIXTURE
from openpi.models.fast_prompt import FASTPromptFormat, prefix_text
from openpi.models.fast_tokenizer import FASTTokenizer
from openpi.models.tokenizer import EMBEDDED_TOKENIZER

T, D = 10, 7


def planted_chunks(n: int, seed: int) -> np.ndarray:
    """Smooth chunks: per dimension one sinusoid of planted amplitude, frequency and phase, plus a gripper-like
    step in the last dimension."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, T)[None, :, None]
    amp, freq, phase = rng.uniform(-0.9, 0.9, (n, 1, D)), rng.uniform(0.2, 2.0, (n, 1, D)), rng.uniform(0, 6.3, (n, 1, D))
    chunks = amp * np.sin(2 * np.pi * freq * t + phase)
    switch = rng.integers(0, T + 1, n)
    chunks[:, :, -1] = np.where(np.arange(T)[None] < switch[:, None], -1.0, 1.0)
    return chunks.astype(np.float32)


@pytest.fixture(scope="module")
def tok():
    return FASTTokenizer.train(planted_chunks(400, seed=0), scale=10.0, vocab_size=384)


def test_round_trip_within_quantisation_step(tok):
    chunks = planted_chunks(60, seed=1)  # not seen in training
    bound = tok.error_bound(T)
    lengths = []
    for chunk in chunks:
        ids = tok.encode(chunk)
        lengths.append(len(ids))
        result = tok.decode(ids)
        assert result.ok, result.reason
        # BPE is lossless: decoding gives exactly the quantised coefficients, frequency-major
        expected = np.around(dct(chunk.astype(np.float64), axis=0, norm="ortho") * tok.scale)
        np.testing.assert_array_equal(result.coefficients, expected)
        np.testing.assert_allclose(result.actions, idct(expected / tok.scale, axis=0, norm="ortho"), atol=1e-6)
        err = result.actions - chunk
        assert np.abs(err).max() <= bound + 1e-6
        assert np.sqrt(np.mean(err ** 2, axis=0)).max() <= 0.5 / tok.scale + 1e-6
    assert np.mean(lengths) < 0.75 * T * D  # BPE merges: fewer tokens than coefficients


def test_flattening_is_frequency_major(tok):
    chunk = np.zeros((T, D), np.float32)
    chunk[:, 2] = 0.5  # a constant in dimension 2: only its frequency-0 coefficient is non-zero
    q = tok.quantize(chunk)
    assert np.flatnonzero(q).tolist() == [2] and q[2] == round(0.5 * np.sqrt(T) * tok.scale)


def test_invalid_sequences_are_flagged_not_raised(tok):
    good = tok.encode(planted_chunks(1, seed=2)[0])
    lone_byte = tok.bpe.token_to_id("\u00c3")  # the first byte of a two-byte symbol, alone
    cases = {"empty": [], "out of vocabulary": good[:3] + [tok.vocab_size + 5], "too short": good[:-2],
             "too long": good + good[:4], "cut symbol": [lone_byte]}
    for name, ids in cases.items():
        result = tok.decode(ids, time_horizon=T, action_dim=D)
        assert not result.ok and result.actions is None and result.reason, name
    rng = np.random.default_rng(3)
    for _ in range(300):  # random generations never crash
        result = tok.decode(rng.integers(-5, tok.vocab_size + 5, rng.integers(0, 60)), time_horizon=T, action_dim=D)
        assert isinstance(result.ok, bool) and (result.ok or result.reason)


def test_fit_length_decodes_a_miscounted_sequence_and_says_so(tok):
    """Too many coefficients: the extras are dropped, giving exactly the full decode. Too few: the missing highest
    frequencies are 0, far closer to the chunk than the reference's zero chunk. Both flagged ``fitted``."""
    chunk = planted_chunks(1, seed=5)[0]
    ids = tok.encode(chunk)
    full = tok.decode(ids)
    longer = tok.decode(ids + ids[-2:], fit_length=True)
    assert not tok.decode(ids + ids[-2:]).ok and longer.ok and longer.fitted and "fitted" in longer.reason
    np.testing.assert_array_equal(longer.coefficients, full.coefficients)
    shorter = tok.decode(ids[:-1], fit_length=True)
    assert not tok.decode(ids[:-1]).ok and shorter.ok and shorter.fitted
    n_missing = T * D - len("".join(tok.bpe.decode(ids[:-1])))
    np.testing.assert_array_equal(shorter.coefficients.reshape(-1)[:T * D - n_missing],
                                  full.coefficients.reshape(-1)[:T * D - n_missing])
    assert (shorter.coefficients.reshape(-1)[T * D - n_missing:] == 0).all()
    assert np.abs(shorter.actions - chunk).mean() < 0.5 * np.abs(chunk).mean()  # zeros would be off by all of it
    assert not full.fitted and full.reason == ""


def test_out_of_range_chunk_is_an_error_unless_clamped(tok):
    chunk = planted_chunks(1, seed=4)[0] * 50
    with pytest.raises(ValueError, match="min_token"):
        tok.encode(chunk)
    assert tok.decode(tok.encode(chunk, clamp=True)).ok


def test_save_and_load_folder(tok, tmp_path):
    folder = tok.save(tmp_path / "fast")
    loaded = FASTTokenizer.load(folder)
    chunk = planted_chunks(1, seed=5)[0]
    assert loaded.encode(chunk) == tok.encode(chunk)
    assert (loaded.scale, loaded.min_token, loaded.time_horizon, loaded.action_dim) == (10.0, tok.min_token, T, D)
    assert json.loads((folder / "processor_config.json").read_text())["vocab_size"] == tok.vocab_size
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        FASTTokenizer.load(folder)


# ------------------------------------------------------------------------------------------------ prompt layout


def test_layout_matches_openpi_fixture(tok):
    """Rebuild the fixture's train and infer sequences from its prefix ids and raw FAST tokens (the fixture uses
    synthetic ids: "Action: " = 600 601, "|" = 603; vocab 1024)."""
    z = np.load(FAST_FIXTURE)
    stub = {"Action: ": [600, 601], "|": [603]}
    fmt = FASTPromptFormat(lambda text: stub[text], tok, vocab_size=1024, max_len=48)
    for b in range(2):
        n = int(z["input/prefix_len"][b])
        prefix = z["input/tokenized_prompt"][b, :n]
        raw = z["input/fast_tokens"][b]
        raw = raw[raw >= 0]
        train = fmt.assemble(prefix, fmt.postfix_ids(raw))
        for ours, key in ((train.tokens, "tokenized_prompt"), (train.mask, "tokenized_prompt_mask"),
                          (train.ar_mask, "token_ar_mask"), (train.loss_mask, "token_loss_mask")):
            np.testing.assert_array_equal(ours, z[f"input/{key}"][b], err_msg=key)
            np.testing.assert_array_equal(fmt.assemble(prefix).__dict__[_field(key)], z[f"input/infer/{key}"][b])
        found, reason = fmt.extract_fast_tokens(train.tokens[n:])
        assert reason == "" and found.tolist() == raw.tolist()


def _field(key: str) -> str:
    return {"tokenized_prompt": "tokens", "tokenized_prompt_mask": "mask", "token_ar_mask": "ar_mask",
            "token_loss_mask": "loss_mask"}[key]


def test_prompt_round_trip_with_sentencepiece(tok):
    fmt = FASTPromptFormat.from_sentencepiece(EMBEDDED_TOKENIZER, tok, vocab_size=1024, max_len=96)
    chunk = planted_chunks(1, seed=6)[0]
    state = np.array([-1.0, -0.5, 0.0, 0.3, 0.99, 1.0, 0.2, -0.2])
    seq = fmt.tokenize("Pick_up the BLACK bowl", state, chunk)
    assert seq.tokens[0] == 2 and seq.tokens[seq.length - 1] == 1 and not seq.mask[seq.length:].any()
    assert prefix_text("Pick_up the BLACK bowl", state).startswith("Task: pick up the black bowl, State: 0 64 128 ")
    infer = fmt.tokenize("Pick_up the BLACK bowl", state)
    np.testing.assert_array_equal(infer.tokens[:infer.length], seq.tokens[:seq.prefix_len])
    assert infer.length == seq.prefix_len and not infer.ar_mask.any()
    generated = seq.tokens[seq.prefix_len:seq.length]
    parsed = fmt.parse(np.concatenate([generated, [7, 9]]), T, D)  # ids after EOS are ignored
    assert parsed.ok, parsed.reason
    assert np.abs(parsed.actions - chunk).max() <= tok.error_bound(T) + 1e-6
    lo, hi = fmt.action_id_range
    assert lo >= 512 and np.all((generated[3:-3] >= lo) & (generated[3:-3] <= hi))


def test_invalid_generations_are_flagged(tok):
    fmt = FASTPromptFormat.from_sentencepiece(EMBEDDED_TOKENIZER, tok, vocab_size=1024, max_len=96)
    good = fmt.postfix_ids(tok.encode(planted_chunks(1, seed=7)[0]))
    cases = {"no marker": good[len(fmt.action_marker):], "text inside the actions": good[:4] + [5] + good[4:],
             "truncated": good[:len(fmt.action_marker) + 2], "nothing": [], "only marker": fmt.action_marker}
    for name, ids in cases.items():
        parsed = fmt.parse(ids, T, D)
        assert not parsed.ok and parsed.actions is None and parsed.reason, name
    assert "not an action token" in fmt.parse(cases["text inside the actions"], T, D).reason
    with pytest.raises(ValueError, match="overlap"):
        FASTPromptFormat.from_sentencepiece(EMBEDDED_TOKENIZER, tok, vocab_size=700, max_len=96)


# ------------------------------------------------------------------------------------------------ training script


def test_train_script_on_demos_and_on_chunks(tmp_path, capsys):
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "train_fast_tokenizer.py"
    mod = types.SimpleNamespace(**runpy.run_path(str(script)))
    from openpi.training.demos import write_synthetic_demos
    root = write_synthetic_demos(tmp_path / "demos", episodes=3, steps=20)
    mod.main(mod.Args(out=tmp_path / "tok_demos", demos=(root,), vocab_size=300))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["chunks"] == 60 and summary["chunk_shape"] == [10, 7]
    assert summary["round_trip_max_abs_error"] <= summary["error_bound"]
    loaded = FASTTokenizer.load(tmp_path / "tok_demos")
    assert (tmp_path / "tok_demos" / "norm_stats.json").is_file() and loaded.vocab_size == 300
    np.save(tmp_path / "chunks.npy", planted_chunks(100, seed=8))
    mod.main(mod.Args(out=tmp_path / "tok_npy", chunks=tmp_path / "chunks.npy", vocab_size=320))
    from_npy = FASTTokenizer.load(tmp_path / "tok_npy")
    assert from_npy.decode(from_npy.encode(planted_chunks(1, seed=9)[0])).ok
