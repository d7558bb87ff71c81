"""Data ready for training and evaluation: the tokenizer, memory-mapped training and validation examples, and
a few fixed prompts to sample at each evaluation.

Everything tokenized is cached on disk, keyed by the data (file path, size and modification time, or the
records' content), the tokenizer, the prompt template's version and the window length: the first run on a
data set tokenizes it once, with a progress bar; every later run opens the cache in a fraction of a second.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tinylm.config import Config
from tinylm.data.cache import digest, load_or_build
from tinylm.data.instructions import encode_records, split_records, validation_size
from tinylm.data.sources import DataError, load_records, records_fingerprint
from tinylm.data.text import is_text_source, read_documents, split_documents, text_fingerprint, token_stream
from tinylm.data.tokens import TokenArrays
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import BPE_MAX_WORD, Tokenizer, build_tokenizer, tokenizer_from_dict

log = logging.getLogger("tinylm")

SAMPLE_PROMPTS = 3
SAMPLE_TOKENS = 40
# A text sample starts from this many tokens of held-out text.
TEXT_PROMPT_TOKENS = 16


@dataclass(frozen=True)
class SamplePrompt:
    text: str
    ids: list[int]


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    train: TokenArrays
    val: TokenArrays
    samples: list[SamplePrompt]
    # Stop strings for the samples: the instruction template's, or none for plain text.
    stop: tuple[str, ...]
    # Names this exact tokenized data; checkpoints keep it so a resume notices changed data.
    key: str
    is_text: bool


def sample_prompt_budget(max_seq_length: int) -> int:
    """Prompt tokens that leave room for SAMPLE_TOKENS of answer (half the window in tiny models)."""
    return max(max_seq_length // 2, max_seq_length - SAMPLE_TOKENS)


def prepare_data(config: Config, *, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Tokenized splits of config.data.source; `tokenizer` is given when resuming or starting from a
    checkpoint, else it is built from the config (a bpe one is trained on the training split, and cached)."""
    started = time.perf_counter()
    d, seed = config.data, config.train.seed
    is_text = is_text_source(d.source)
    if is_text:
        source = text_fingerprint(d)
        split: dict[str, Any] = {"val_fraction": d.val_fraction}

        @functools.cache
        def splits() -> tuple[list[Any], list[Any]]:
            return split_documents(read_documents(d), val_fraction=d.val_fraction)

        def texts() -> Iterable[str]:
            return splits()[0]

    else:
        size = d.dataset_size + validation_size(d.dataset_size, d.val_fraction)
        source = records_fingerprint(d.source, synthetic_size=size, seed=seed)
        split = {"dataset_size": d.dataset_size, "val_fraction": d.val_fraction, "seed": seed}

        @functools.cache
        def splits() -> tuple[list[Any], list[Any]]:
            records = load_records(d.source, synthetic_size=size, seed=seed)
            s = split_records(records, dataset_size=d.dataset_size, val_fraction=d.val_fraction, seed=seed)
            return s.train, s.val

        def texts() -> Iterable[str]:
            # Records as the model will see them, so a trained BPE also learns the template's headers.
            return (TEMPLATE.render(r.instruction, r.context, r.response) for r in splits()[0])

    if tokenizer is None:
        tokenizer = _build_tokenizer(config, {"source": source, "split": split}, texts)
    key = {
        "kind": "text" if is_text else "instructions",
        "source": source,
        "split": split,
        "tokenizer": digest(tokenizer.to_dict()),
        "max_seq_length": config.model.max_seq_length,
        "samples": [SAMPLE_PROMPTS, SAMPLE_TOKENS, TEXT_PROMPT_TOKENS],
    }
    if not is_text:
        key.update(template=TEMPLATE.version, train_on_prompt=d.train_on_prompt)
    build = _build_text if is_text else _build_instructions
    folder, meta = load_or_build("tokens", key, lambda out: build(out, config, tokenizer, splits))
    data = PreparedData(
        tokenizer=tokenizer,
        train=TokenArrays.load(folder, "train"),
        val=TokenArrays.load(folder, "val"),
        samples=[SamplePrompt(**s) for s in meta["samples"]],
        stop=() if is_text else TEMPLATE.stop_strings,
        key=folder.name,
        is_text=is_text,
    )
    log.info(
        "data: %s training and %s validation %s (%s tokens) from %s, ready in %.2f s",
        f"{len(data.train):,}",
        f"{len(data.val):,}",
        "windows" if is_text else "examples",
        f"{len(data.train.tokens):,}",
        d.source,
        time.perf_counter() - started,
    )
    return data


def _build_tokenizer(
    config: Config, data_key: dict[str, Any], texts: Callable[[], Iterable[str]]
) -> Tokenizer:
    d = config.data
    if d.tokenizer != "bpe":
        return build_tokenizer(d.tokenizer, gpt2_ranks_path=d.gpt2_ranks_path)

    def train(out: Path) -> dict[str, Any]:
        log.info("training a %d-token byte-level BPE on the training split", d.bpe_vocab_size)
        tokenizer = build_tokenizer("bpe", texts=texts(), vocab_size=d.bpe_vocab_size)
        (out / "tokenizer.json").write_text(json.dumps(tokenizer.to_dict()))
        return {}

    key = {
        **data_key,
        "bpe_vocab_size": d.bpe_vocab_size,
        "bpe_max_word": BPE_MAX_WORD,
        "template": TEMPLATE.version,
    }
    folder, _ = load_or_build("tokenizers", key, train)
    return tokenizer_from_dict(json.loads((folder / "tokenizer.json").read_text()))


# Progress bars show on a terminal (with ETA) and stay silent when the output is a file or a pipe.
_BAR: dict[str, Any] = {"disable": None, "leave": False, "unit_scale": True}


def _build_instructions(out: Path, config: Config, tokenizer: Tokenizer, splits: Callable) -> dict[str, Any]:
    train, val = splits()
    log.info("tokenizing %s records of %s", f"{len(train) + len(val):,}", config.data.source)
    for name, records in (("train", train), ("val", val)):
        examples = encode_records(
            tokenizer,
            tqdm(records, desc=f"tokenizing {name}", unit="records", **_BAR),
            max_seq_length=config.model.max_seq_length,
            train_on_prompt=config.data.train_on_prompt,
        )
        TokenArrays.from_examples(examples, vocab_size=tokenizer.vocab_size).save(out, name)
    budget = sample_prompt_budget(config.model.max_seq_length)
    samples = [
        {
            "text": r.instruction,
            "ids": TEMPLATE.encode_prompt(tokenizer, r.instruction, r.context, budget=budget),
        }
        for r in val[:SAMPLE_PROMPTS]
    ]
    return {"samples": samples}


def _build_text(out: Path, config: Config, tokenizer: Tokenizer, splits: Callable) -> dict[str, Any]:
    train, val = splits()
    total = sum(len(t) for t in train) + sum(len(t) for t in val)
    log.info("tokenizing %s characters of %s", f"{total:,}", config.data.source)
    window = config.model.max_seq_length
    with tqdm(total=total, desc="tokenizing", unit="chars", **_BAR) as bar:
        streams = {"train": token_stream(tokenizer, train, progress=bar.update)}
        streams["val"] = token_stream(tokenizer, val, progress=bar.update)
    for name, stream in streams.items():
        arrays = TokenArrays.windows(stream, max_seq_length=window)
        if not len(arrays):
            where = "the first" if name == "train" else "the last"
            share = 1 - config.data.val_fraction if name == "train" else config.data.val_fraction
            raise DataError(
                f"{config.data.source}: {where} {share:.0%} of the text is {len(stream)} tokens, less than "
                f"one window of max_seq_length + 1 = {window + 1} (use more text, a shorter max_seq_length "
                "or another val_fraction)"
            )
        arrays.save(out, name)
    # Evenly spaced starts in the held-out text, so the prompts differ.
    val_stream = streams["val"]
    step = max(1, len(val_stream) // SAMPLE_PROMPTS)
    length = min(TEXT_PROMPT_TOKENS, sample_prompt_budget(window))
    samples = []
    for start in range(0, step * SAMPLE_PROMPTS, step):
        ids = [int(t) for t in val_stream[start : start + length]]
        if ids:
            samples.append({"text": tokenizer.decode(ids), "ids": ids})
    return {"samples": samples}
