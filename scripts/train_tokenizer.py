"""Train the small SentencePiece model used by the embedded tiny policies.

Why: PaliGemma's 257k-token SentencePiece file cannot be downloaded here and is far too large to commit; a few
hundred pieces trained on LIBERO's 112 distinct task instructions (plus Pi0.5's prompt template and state bins)
cover every LIBERO prompt, with byte fallback for anything else. Ids follow PaliGemma: pad 0, EOS 1, BOS 2, unk 3.

    python scripts/train_tokenizer.py            # rewrites src/openpi/assets/tokenizer/libero_tiny.model
"""
from __future__ import annotations

import dataclasses
import io
import pathlib
import random

import sentencepiece
import tyro

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "src" / "openpi" / "assets" / "tokenizer"


@dataclasses.dataclass
class Args:
    instructions: pathlib.Path = ASSETS / "libero_instructions.txt"
    out_prefix: pathlib.Path = ASSETS / "libero_tiny"
    vocab_size: int = 512
    seed: int = 0


def corpus(instructions: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = list(instructions)
    for text in instructions:
        bins = " ".join(str(rng.randrange(256)) for _ in range(8))
        lines.append(f"Task: {text}, State: {bins};")
        lines.append("Action: ")
    return lines


def main(args: Args) -> None:
    instructions = [l.strip() for l in args.instructions.read_text().splitlines() if l.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(instructions, args.seed)), model_writer=model, vocab_size=args.vocab_size,
        model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        character_coverage=1.0, split_digits=False, num_threads=1, minloglevel=2,
        # keep "\n" (Pi0's prompt terminator) as its own piece instead of normalising it away
        normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=["\n"])
    args.out_prefix.with_suffix(".model").write_bytes(model.getvalue())
    print(f"wrote {args.out_prefix.with_suffix('.model')} ({len(model.getvalue())} bytes, {args.vocab_size} pieces)")


if __name__ == "__main__":
    main(tyro.cli(Args))
