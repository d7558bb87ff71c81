"""BPE tokenizer training time on ordinary text and on one long run without a space, side by side.

tinylm's trained BPE cuts pre-tokens longer than BPE_MAX_WORD bytes (see tinylm/tokenizer.py), so a run
without a space costs what ordinary text of the same size costs. The "before" rows train the same BPE with
GPT-2's word split alone (what tinylm did before), whose time grows with the square of a run's length; they
stop at --before-max characters.

    python benchmarks/bpe_training.py                      # 1, 5 and 20 MB; before-rows up to 500k chars
    python benchmarks/bpe_training.py --sizes 0.25,1 --before-max 250000
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 4096


def texts_of(size: int, kind: str, source: str) -> list[str]:
    """`size` characters: the corpus as it is (ordinary text, in 1,000-line documents), or its letters
    alone, run together into one string without a space or a newline."""
    if kind == "run":
        letters = re.sub(r"[^A-Za-z]", "", source)
        return [(letters * (size // len(letters) + 1))[:size]]
    text = (source * (size // len(source) + 1))[:size]
    lines = text.splitlines(keepends=True)
    return ["".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000)]


def tinylm_seconds(texts: list[str]) -> float:
    from tinylm.tokenizer import build_tokenizer

    started = time.perf_counter()
    build_tokenizer("bpe", texts=texts, vocab_size=VOCAB)
    return time.perf_counter() - started


def before_seconds(texts: list[str]) -> float:
    """The same trainer with GPT-2's byte-level word split alone."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    started = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,5,20", help="comma-separated sizes in MB (default 1,5,20)")
    parser.add_argument("--before-max", type=int, default=500_000, help="largest size for the before rows")
    args = parser.parse_args()
    if not SHAKESPEARE.is_file():
        sys.exit(f"error: {SHAKESPEARE} is missing (the shared data folder beside the repository)")
    source = SHAKESPEARE.read_text(encoding="utf-8")
    sizes = [int(float(s) * 1_000_000) for s in args.sizes.split(",")]
    before_sizes = sorted({s for s in (250_000, 500_000) if s <= args.before_max})
    print(f"{os.cpu_count()} CPUs; vocab {VOCAB}; load average {os.getloadavg()[0]:.2f}")
    print("\n| text | characters | tinylm s | before (word split only) s |")
    print("| --- | ---: | ---: | ---: |")
    for size in sorted(set(sizes) | set(before_sizes)):
        for kind in ("ordinary", "run"):
            texts = texts_of(size, kind, source)
            ours = f"{tinylm_seconds(texts):.2f}"
            before = f"{before_seconds(texts):.2f}" if size in before_sizes else ""
            print(f"| {kind} | {size:,} | {ours} | {before} |", flush=True)


if __name__ == "__main__":
    main()
