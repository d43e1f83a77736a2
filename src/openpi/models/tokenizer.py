"""SentencePiece prompt tokenizer with openpi's Pi0 and Pi0.5 prompt formats.

Besides ids and mask it returns where the instruction words sit, so recordings can separate instruction tokens from
template/state tokens (the predecessor read a camera span as "text" because it had no such table).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np
import sentencepiece

logger = logging.getLogger(__name__)

EMBEDDED_TOKENIZER = pathlib.Path(__file__).resolve().parents[1] / "assets" / "tokenizer" / "libero_tiny.model"


def clean_prompt(text: str) -> str:
    return text.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray, bins: int = 256) -> np.ndarray:
    """Bin index of each normalised state value over [-1, 1] (Pi0.5 discrete state input)."""
    return np.digitize(state, bins=np.linspace(-1, 1, bins + 1)[:-1]) - 1


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
    ids: np.ndarray  # (max_len,) int32, padded with 0
    mask: np.ndarray  # (max_len,) bool
    instruction: tuple[int, int]  # [start, end) of the instruction words within the prompt positions
    length: int  # number of valid tokens
    state: tuple[int, int] | None = None  # [start, end) of the discretised state bins (Pi0.5 state-in-prompt)


class PromptTokenizer:
    def __init__(self, model_path: str | pathlib.Path, max_len: int, on_overflow: str = "error") -> None:
        model_path = pathlib.Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {model_path} not found (expected a SentencePiece .model file)")
        if on_overflow not in ("error", "truncate"):
            raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.model_path = model_path
        self.max_len = max_len
        self.on_overflow = on_overflow

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def decode_ids(self, ids) -> list[str]:
        """Each id as its own piece string (for labelling text attention)."""
        return [self._sp.id_to_piece(int(i)) for i in ids]

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> TokenizedPrompt:
        """Pi0: BOS + text + "\\n". Pi0.5 with state: BOS + "Task: {text}, State: {bins};\\nAction: "."""
        text = clean_prompt(prompt)
        bos = [self._sp.bos_id()]
        if state is None:
            body = self._sp.encode(text)
            ids = bos + body + self._sp.encode("\n")
            start, end = 1, 1 + len(body)
            state_span = None
        else:
            state_str = " ".join(str(int(v)) for v in discretize_state(np.asarray(state)))
            ids = bos + self._sp.encode(f"Task: {text}, State: {state_str};\nAction: ")
            # The instruction is where the full sequence agrees with "Task: {text}" but not with "Task: ".
            start = common_prefix_length(ids, bos + self._sp.encode("Task: "))
            end = common_prefix_length(ids, bos + self._sp.encode(f"Task: {text}"))
            # The state bins likewise: after "..., State: " and up to where "..., State: {bins}" stops agreeing
            # (SentencePiece may merge the last digit with ";", which then counts as template).
            s0 = common_prefix_length(ids, bos + self._sp.encode(f"Task: {text}, State: "))
            s1 = common_prefix_length(ids, bos + self._sp.encode(f"Task: {text}, State: {state_str}"))
            state_span = (max(s0, end), max(s1, s0, end))
        if len(ids) > self.max_len:
            shown = prompt if len(prompt) <= 120 else f"{prompt[:120]}... ({len(prompt)} characters)"
            msg = (f"prompt {shown!r} is {len(ids)} tokens long, more than max_token_len={self.max_len} "
                   f"(tokenizer {self.model_path.name})")
            if self.on_overflow == "error":
                raise ValueError(msg)
            logger.warning("%s; truncating", msg)
            ids = ids[: self.max_len]
        n = len(ids)
        out = np.zeros(self.max_len, np.int32)
        out[:n] = ids
        mask = np.arange(self.max_len) < n
        clip = (lambda ab: (min(ab[0], n), min(ab[1], n)))
        return TokenizedPrompt(out, mask, clip((start, end)), n, None if state_span is None else clip(state_span))


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids two sequences share (locates a piece of text inside a whole-string encoding)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
