"""FAST action tokenizer: action chunk <-> short token sequence (DCT over time, quantise, byte-level BPE).

Encoding a chunk ``(T, D)`` (normalised actions): a type-II orthonormal DCT along time for every action dimension
(scipy), coefficients times ``scale`` rounded to integers, flattened frequency-major (all dimensions of frequency 0,
then of frequency 1, ...), shifted by ``-min_token`` (clamped at 0) and written as one character per coefficient;
a byte-level BPE turns that string into token ids. Decoding reverses it; a sequence that does not decode to exactly
``T * D`` coefficients is a flagged failure (:class:`FASTDecodeResult` with ``ok=False``), never an exception.

Round trip: the orthonormal DCT preserves the L2 norm, so with every coefficient off by at most ``0.5 / scale``
the reconstruction of each dimension has RMS error <= ``0.5 / scale`` and max error <= ``0.5 * sqrt(T) / scale``
(:meth:`FASTTokenizer.error_bound`).

A tokenizer lives in a folder holding ``tokenizer.json`` (HF ``tokenizers`` format) and ``processor_config.json``
(``scale``, ``min_token``, ``vocab_size``, ``time_horizon``, ``action_dim``): the layout of the released
``physical-intelligence/fast`` folder, so a local copy of it loads with :meth:`FASTTokenizer.load` (nothing is
downloaded). :meth:`FASTTokenizer.train` fits one on action chunks; unlike the reference trainer it seeds the BPE
alphabet with all 256 byte symbols, so a coefficient never seen in training still encodes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from scipy.fft import dct, idct
from tokenizers import decoders, models, pre_tokenizers, trainers

PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_JSON = "tokenizer.json"
BYTE_ALPHABET_SIZE = 256  # byte-level BPE: every string is spelled with these 256 symbols


@dataclasses.dataclass(frozen=True)
class FASTDecodeResult:
    """Outcome of decoding one token sequence: ``actions`` (T, D) when ``ok``, else None with a ``reason``."""

    ok: bool
    actions: np.ndarray | None
    reason: str = ""
    coefficients: np.ndarray | None = None  # (T, D) integer DCT coefficients when they could be read
    fitted: bool = False  # decoded with fit_length after a coefficient count that did not fill the chunk


def _failure(reason: str, coefficients: np.ndarray | None = None) -> FASTDecodeResult:
    return FASTDecodeResult(False, None, reason, coefficients)


class FASTTokenizer:
    """Encode/decode action chunks with one BPE model and its quantisation settings."""

    def __init__(self, bpe: tokenizers.Tokenizer, *, scale: float = 10.0, min_token: int = 0,
                 time_horizon: int | None = None, action_dim: int | None = None) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.bpe = bpe
        self.scale = float(scale)
        self.min_token = int(min_token)
        self.time_horizon = time_horizon
        self.action_dim = action_dim

    @property
    def vocab_size(self) -> int:
        """Number of FAST token ids (ids are 0 .. vocab_size - 1)."""
        return self.bpe.get_vocab_size()

    def error_bound(self, time_horizon: int) -> float:
        """Max |reconstruction error| of any action value after a round trip (quantisation only)."""
        return 0.5 * math.sqrt(time_horizon) / self.scale

    # -------------------------------------------------------------------------------------------- encoding

    def quantize(self, chunk: np.ndarray) -> np.ndarray:
        """(T, D) actions -> (T * D,) integer DCT coefficients, frequency-major."""
        chunk = np.asarray(chunk, np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"an action chunk must be (time, action_dim), got shape {chunk.shape}")
        return np.around(dct(chunk, axis=0, norm="ortho") * self.scale).astype(np.int64).reshape(-1)

    def _to_text(self, coefficients: np.ndarray) -> str:
        return "".join(map(chr, np.maximum(coefficients - self.min_token, 0)))

    def encode(self, chunk: np.ndarray, *, clamp: bool = False) -> list[int]:
        """Token ids of one (T, D) chunk.

        A coefficient below ``min_token`` cannot be represented: by default that is an error (the chunk is outside
        what the tokenizer was fitted on, e.g. not normalised); ``clamp=True`` clamps it as the reference does.
        """
        coefficients = self.quantize(chunk)
        if not clamp and coefficients.min() < self.min_token:
            k = int(np.argmin(coefficients))
            raise ValueError(f"DCT coefficient {int(coefficients[k])} (frequency {k // chunk.shape[-1]}, dimension "
                             f"{k % chunk.shape[-1]}) is below the tokenizer's min_token {self.min_token}: is the "
                             "chunk normalised like the training data? (clamp=True clamps as the reference does)")
        text = self._to_text(coefficients)
        ids = self.bpe.encode(text).ids
        if self.bpe.decode(ids) != text:
            raise ValueError("this tokenizer's vocabulary cannot spell the chunk's DCT coefficients (a byte symbol "
                             "is missing from its alphabet); retrain it on data covering this range")
        return ids

    def encode_batch(self, chunks: np.ndarray | Sequence[np.ndarray], *, clamp: bool = False) -> list[list[int]]:
        return [self.encode(c, clamp=clamp) for c in chunks]

    # -------------------------------------------------------------------------------------------- decoding

    def decode(self, ids: Sequence[int] | np.ndarray, *, time_horizon: int | None = None,
               action_dim: int | None = None, fit_length: bool = False) -> FASTDecodeResult:
        """Token ids -> (T, D) actions, or a flagged failure naming what is wrong with the sequence.

        A coefficient count other than T x D fails, as in the reference (which then returns zeros). With
        ``fit_length`` such a sequence is decoded anyway: coefficients are frequency-major, so the missing ones are
        the highest frequencies and are taken as 0, extra ones are dropped; ``fitted`` and ``reason`` say so. Why
        offer it: a small model often misses the count by one or two tokens' worth, and zeros (the reference's
        answer) throw away a chunk whose low frequencies, which carry almost all of the motion, are right."""
        t = time_horizon or self.time_horizon
        d = action_dim or self.action_dim
        if not t or not d:
            raise ValueError("decoding needs the chunk shape: pass time_horizon and action_dim (the released "
                             "tokenizer's processor_config.json leaves them null)")
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids:
            return _failure("empty token sequence")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            return _failure(f"token id {bad[0]} is outside the FAST vocabulary [0, {self.vocab_size})")
        text = self.bpe.decode(ids)
        if "\ufffd" in text:
            return _failure("tokens do not form a valid byte sequence (a multi-byte symbol was cut)")
        values = np.array([ord(c) for c in text], np.int64) + self.min_token
        reason, fitted = "", False
        if values.size != t * d:
            reason = f"decoded {values.size} DCT coefficients, expected {t} x {d} = {t * d}"
            if not fit_length:
                return _failure(reason)
            values = np.concatenate([values[:t * d], np.zeros(max(t * d - values.size, 0), np.int64)])
            reason, fitted = reason + " (fitted: missing high frequencies taken as 0, extra ones dropped)", True
        coefficients = values.reshape(t, d)
        actions = idct(coefficients.astype(np.float64) / self.scale, axis=0, norm="ortho")
        return FASTDecodeResult(True, actions.astype(np.float32), reason, coefficients, fitted)

    # -------------------------------------------------------------------------------------------- files

    @classmethod
    def load(cls, folder: str | pathlib.Path) -> FASTTokenizer:
        """Read ``tokenizer.json`` + ``processor_config.json`` from a local folder (e.g. a copy of the released
        physical-intelligence/fast, or one written by :meth:`save`)."""
        folder = pathlib.Path(folder)
        for name in (TOKENIZER_JSON, PROCESSOR_CONFIG):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found: a FAST tokenizer folder holds {TOKENIZER_JSON} "
                                        f"and {PROCESSOR_CONFIG}")
        config = json.loads((folder / PROCESSOR_CONFIG).read_text())
        missing = [k for k in ("scale", "min_token") if k not in config]
        if missing:
            raise ValueError(f"{folder / PROCESSOR_CONFIG}: missing key(s) {missing}")
        return cls(tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_JSON)), scale=config["scale"],
                   min_token=config["min_token"], time_horizon=config.get("time_horizon"),
                   action_dim=config.get("action_dim"))

    def save(self, folder: str | pathlib.Path) -> pathlib.Path:
        """Write the folder :meth:`load` reads (same file names and keys as the released tokenizer)."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.bpe.save(str(folder / TOKENIZER_JSON))
        config = {"processor_class": "UniversalActionProcessor", "scale": self.scale, "min_token": self.min_token,
                  "vocab_size": self.vocab_size, "time_horizon": self.time_horizon, "action_dim": self.action_dim}
        (folder / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    # -------------------------------------------------------------------------------------------- training

    @classmethod
    def train(cls, chunks: np.ndarray | Iterable[np.ndarray], *, scale: float = 10.0, vocab_size: int = 1024,
              min_frequency: int = 2) -> FASTTokenizer:
        """Fit the BPE on the quantised DCT coefficients of (T, D) chunks (all of one shape)."""
        chunks = [np.asarray(c, np.float64) for c in chunks]
        if not chunks:
            raise ValueError("no action chunks to train on")
        shapes = {c.shape for c in chunks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"training chunks must all be (time, action_dim) of one shape, got {sorted(shapes)}")
        if vocab_size <= BYTE_ALPHABET_SIZE:
            raise ValueError(f"vocab_size must exceed the {BYTE_ALPHABET_SIZE} byte symbols, got {vocab_size}")
        quantised = cls(tokenizers.Tokenizer(models.BPE()), scale=scale)
        coefficients = [quantised.quantize(c) for c in chunks]
        min_token = int(min(c.min() for c in coefficients))
        bpe = tokenizers.Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                                      max_token_length=10_000)
        shifted = cls(bpe, scale=scale, min_token=min_token)
        bpe.train_from_iterator((shifted._to_text(c) for c in coefficients), trainer=trainer)
        t, d = next(iter(shapes))
        return cls(bpe, scale=scale, min_token=min_token, time_horizon=t, action_dim=d)
