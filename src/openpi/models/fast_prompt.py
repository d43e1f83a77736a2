"""openpi's Pi0-FAST token layout: building the prompt (+ action tokens for training) and parsing generated ids.

Layout (openpi's ``FASTTokenizer``; ids of PaliGemma's SentencePiece: pad 0, EOS 1, BOS 2)::

    prefix  = BOS + encode("Task: {prompt}, State: {bins};\\n")      ar 0, loss False (bidirectional)
    postfix = encode("Action: ") + action ids + encode("|") + EOS  ar 1, loss True  (causal, predicted)
    padding = 0 up to max_len                                      mask False, ar 0, loss False

``prompt`` is lower-cased, stripped and has ``_`` replaced by spaces; ``bins`` are the 256-bin indices over
[-1, 1] of the normalised state, space-joined. A FAST token ``t`` becomes the id ``vocab_size - 1 - skip - t``
(the top of the vocabulary below its last ``skip`` = 128 special ids; the map is its own inverse). At inference
the prompt is the prefix alone and the model generates the postfix.

Parsing works on ids (openpi decodes to text and re-encodes; ids avoid that lossy round trip): the ids after the
first ``encode("Action: ")`` up to ``encode("|")``, EOS or the end must all be action ids and FAST-decode to a
``(horizon, action_dim)`` chunk; anything else is a :class:`ParsedActions` with ``ok=False`` and the reason.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from openpi.models.fast_tokenizer import FASTTokenizer
from openpi.models.tokenizer import common_prefix_length, discretize_state

logger = logging.getLogger(__name__)

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
FAST_SKIP_TOKENS = 128


def clean_fast_prompt(text: str) -> str:
    """openpi's FAST prompt cleaning (differs from Pi0's: lower-cased, newlines kept)."""
    return text.lower().strip().replace("_", " ")


def state_bins_text(state: np.ndarray) -> str:
    return " ".join(str(int(v)) for v in discretize_state(np.asarray(state)))


def prefix_text(prompt: str, state: np.ndarray) -> str:
    return f"Task: {clean_fast_prompt(prompt)}, State: {state_bins_text(state)};\n"


@dataclasses.dataclass(frozen=True)
class FASTPrompt:
    """One sample's model inputs (all ``max_len`` long) plus where the prefix ends."""

    tokens: np.ndarray  # int32 ids, 0-padded
    mask: np.ndarray  # bool: real tokens
    ar_mask: np.ndarray  # int32: 0 prefix, 1 postfix
    loss_mask: np.ndarray  # bool: postfix tokens (predicted by the loss)
    prefix_len: int
    length: int
    instruction: tuple[int, int] = (0, 0)  # [start, end) of the instruction words among the prompt positions
    state: tuple[int, int] | None = None  # [start, end) of the discretised state bins among the prompt positions


@dataclasses.dataclass(frozen=True)
class ParsedActions:
    """Actions read back from generated ids: ``actions`` (horizon, action_dim) when ``ok``, else None + reason."""

    ok: bool
    actions: np.ndarray | None
    reason: str = ""
    fast_tokens: np.ndarray | None = None  # raw FAST tokens found between "Action: " and "|"
    fitted: bool = False  # ok only because the coefficient count was fitted (FASTTokenizer.decode fit_length)


def _find(seq: Sequence[int], sub: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of ``sub`` in ``seq`` at or after ``start`` (-1 if none)."""
    n = len(sub)
    for i in range(start, len(seq) - n + 1):
        if list(seq[i:i + n]) == list(sub):
            return i
    return -1


class FASTPromptFormat:
    """Builds and parses Pi0-FAST sequences for one text encoder, FAST tokenizer and model vocabulary."""

    def __init__(self, encode: Callable[[str], list[int]], fast: FASTTokenizer, *, vocab_size: int, max_len: int,
                 text_vocab_size: int | None = None, skip_tokens: int = FAST_SKIP_TOKENS, bos_id: int = BOS_ID,
                 eos_id: int = EOS_ID, on_overflow: str = "error") -> None:
        if on_overflow not in ("error", "truncate"):
            raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
        self.encode_text = encode
        self.fast = fast
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.skip_tokens = skip_tokens
        self.bos_id, self.eos_id = bos_id, eos_id
        self.on_overflow = on_overflow
        top = vocab_size - 1 - skip_tokens
        self.action_id_range = (top - (fast.vocab_size - 1), top)  # inclusive
        if self.action_id_range[0] < 0:
            raise ValueError(f"FAST vocabulary ({fast.vocab_size}) does not fit in a model vocabulary of {vocab_size} "
                             f"with {skip_tokens} reserved ids")
        if text_vocab_size is not None and self.action_id_range[0] < text_vocab_size:
            raise ValueError(f"action ids {self.action_id_range} overlap the text tokenizer's {text_vocab_size} ids: "
                             "use a larger model vocabulary or a smaller FAST vocabulary")
        self.action_marker = list(encode("Action: "))
        self.end_marker = list(encode("|"))

    @classmethod
    def from_sentencepiece(cls, model_path: str | pathlib.Path, fast: FASTTokenizer, *, vocab_size: int,
                           max_len: int, **kwargs) -> FASTPromptFormat:
        """Use a local SentencePiece model (PaliGemma's, or the embedded tiny one) as the text encoder."""
        import sentencepiece
        path = pathlib.Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} not found")
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return cls(sp.encode, fast, vocab_size=vocab_size, max_len=max_len, text_vocab_size=sp.get_piece_size(),
                   bos_id=sp.bos_id(), eos_id=sp.eos_id(), **kwargs)

    # -------------------------------------------------------------------------------------------- ids

    def action_ids(self, fast_tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """FAST tokens -> model vocabulary ids (openpi: vocab_size - 1 - skip - t)."""
        return self.vocab_size - 1 - self.skip_tokens - np.asarray(fast_tokens, np.int64)

    fast_tokens = action_ids  # the map is its own inverse

    def is_action_id(self, ids: np.ndarray) -> np.ndarray:
        lo, hi = self.action_id_range
        return (ids >= lo) & (ids <= hi)

    # -------------------------------------------------------------------------------------------- building

    def assemble(self, prefix_ids: Sequence[int], postfix_ids: Sequence[int] = ()) -> FASTPrompt:
        """Pad (or truncate) prefix + postfix to ``max_len`` with openpi's four arrays."""
        prefix, postfix = [int(i) for i in prefix_ids], [int(i) for i in postfix_ids]
        ids = prefix + postfix
        if len(ids) > self.max_len:
            msg = f"Pi0-FAST sequence is {len(ids)} tokens, more than max_len={self.max_len}"
            if self.on_overflow == "error":
                raise ValueError(msg + " (raise max_token_len, or on_overflow='truncate' as openpi does)")
            logger.warning("%s; truncating", msg)
        n = min(len(ids), self.max_len)
        out = np.zeros(self.max_len, np.int32)
        out[:n] = ids[:n]
        ar = np.zeros(self.max_len, np.int32)
        ar[len(prefix):n] = 1
        mask = np.arange(self.max_len) < n
        return FASTPrompt(out, mask, ar, ar.astype(bool), min(len(prefix), n), n)

    def postfix_ids(self, fast_tokens: Sequence[int]) -> list[int]:
        return self.action_marker + self.action_ids(fast_tokens).tolist() + self.end_marker + [self.eos_id]

    def tokenize(self, prompt: str, state: np.ndarray, actions: np.ndarray | None = None, *,
                 clamp: bool = False) -> FASTPrompt:
        """Training sequence when ``actions`` (horizon, action_dim) are given, else the inference prefix.
        ``clamp``: clamp DCT coefficients below the FAST tokenizer's range (training on normalised demos whose
        tails fall just outside what the tokenizer was fitted on) instead of raising."""
        prefix = [self.bos_id] + list(self.encode_text(prefix_text(prompt, state)))
        postfix = [] if actions is None else self.postfix_ids(self.fast.encode(actions, clamp=clamp))
        out = self.assemble(prefix, postfix)
        # Where the instruction and the state bins sit: where the whole encoding agrees with the encoding of the
        # text up to the end of each piece (SentencePiece may merge across a boundary; that token then counts as
        # template).
        text, bins = clean_fast_prompt(prompt), state_bins_text(state)
        upto = [common_prefix_length(prefix, [self.bos_id] + list(self.encode_text(piece)))
                for piece in ("Task: ", f"Task: {text}", f"Task: {text}, State: ", f"Task: {text}, State: {bins}")]
        n = out.prefix_len
        start, end = min(upto[0], n), min(upto[1], n)
        s0 = min(max(upto[2], end), n)
        return dataclasses.replace(out, instruction=(start, end), state=(s0, min(max(upto[3], s0), n)))

    # -------------------------------------------------------------------------------------------- parsing

    def action_positions(self, generated: Sequence[int] | np.ndarray) -> tuple[int, int, str]:
        """[start, end) of the action tokens among the generated ids (the decoding steps that produced them), or
        (0, 0, reason) when the sequence holds no well-formed run of them."""
        ids = [int(i) for i in np.asarray(generated).reshape(-1)]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        start = _find(ids, self.action_marker)
        if start < 0:
            return 0, 0, f"no 'Action: ' marker {self.action_marker} in the generated ids"
        body_start = start + len(self.action_marker)
        end = _find(ids, self.end_marker, body_start)
        body_end = len(ids) if end < 0 else end
        body = np.asarray(ids[body_start:body_end], np.int64)
        if body.size == 0:
            return 0, 0, "no action tokens after 'Action: '"
        outside = np.flatnonzero(~self.is_action_id(body))
        if outside.size:
            k = int(outside[0])
            return 0, 0, (f"id {int(body[k])} at generated position {body_start + k} is not an action token "
                          f"(action ids are {self.action_id_range[0]}..{self.action_id_range[1]})")
        return body_start, body_end, ""

    def extract_fast_tokens(self, generated: Sequence[int] | np.ndarray) -> tuple[np.ndarray | None, str]:
        """Raw FAST tokens of a generated sequence, or (None, reason)."""
        start, end, reason = self.action_positions(generated)
        if reason:
            return None, reason
        return self.fast_tokens(np.asarray(generated).reshape(-1)[start:end].astype(np.int64)), ""

    def parse(self, generated: Sequence[int] | np.ndarray, action_horizon: int, action_dim: int, *,
              fit_length: bool = False) -> ParsedActions:
        """Generated ids -> (action_horizon, action_dim) normalised actions, or a flagged failure
        (``fit_length``: see ``FASTTokenizer.decode``; ``reason`` then notes a fitted count)."""
        fast_tokens, reason = self.extract_fast_tokens(generated)
        if fast_tokens is None:
            return ParsedActions(False, None, reason)
        decoded = self.fast.decode(fast_tokens, time_horizon=action_horizon, action_dim=action_dim,
                                   fit_length=fit_length)
        if not decoded.ok:
            return ParsedActions(False, None, f"FAST decoding failed: {decoded.reason}", fast_tokens)
        return ParsedActions(True, decoded.actions, decoded.reason, fast_tokens, decoded.fitted)
