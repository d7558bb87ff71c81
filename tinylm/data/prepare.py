"""Data ready for training and evaluation: the tokenizer, memory-mapped training and validation examples, and
a few fixed prompts to sample at each evaluation.

Everything tokenized is cached on disk, keyed by the data (file path, size and modification time, or the
records' content), the tokenizer, the prompt template's version and the window length: the first run on a
data set tokenizes it once, with a progress bar; every later run opens the cache in a fraction of a second.
A mixture of sources is each source's entry, then one entry of them all laid end to end.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tinylm.config import Config
from tinylm.data.cache import digest, load_or_build
from tinylm.data.instructions import encode_records, split_records, validation_size
from tinylm.data.mixture import DataPart, parse_sources
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
    # Where each source's training examples are in `train`, and its weight: one part unless mixed.
    parts: tuple[DataPart, ...]


def sample_prompt_budget(max_seq_length: int) -> int:
    """Prompt tokens that leave room for SAMPLE_TOKENS of answer (half the window in tiny models)."""
    return max(max_seq_length // 2, max_seq_length - SAMPLE_TOKENS)


def prepare_data(config: Config, *, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Tokenized splits of config.data.source (one source, or a mixture of several); `tokenizer` is given
    when resuming or starting from a checkpoint, else it is built from the config (a bpe one is trained on
    the training split, of every source of a mixture, and cached)."""
    started = time.perf_counter()
    components = parse_sources(config.data.source)
    sources = [_Source.read(replace(config, data=replace(config.data, source=c.source))) for c in components]
    if tokenizer is None:
        identity = sources[0].identity if len(sources) == 1 else {"sources": [s.identity for s in sources]}
        tokenizer = _build_tokenizer(config, identity, lambda: (t for s in sources for t in s.texts()))
    entries = [source.tokenized(tokenizer) for source in sources]
    if len(entries) == 1:
        folder, meta = entries[0]
    else:
        # The mixture's sources laid end to end, so training reads one set of arrays; the weights only
        # decide what each step draws, so they are not part of the key.
        mixture_key = {"mixture": [entry_folder.name for entry_folder, _ in entries]}
        folder, meta = load_or_build("tokens", mixture_key, lambda out: _build_mixture(out, entries))
    train = TokenArrays.load(folder, "train")
    sizes = meta.get("train_sizes", [len(train)])
    starts = np.cumsum([0, *sizes[:-1]])
    is_text = all(s.is_text for s in sources)
    data = PreparedData(
        tokenizer=tokenizer,
        train=train,
        val=TokenArrays.load(folder, "val"),
        samples=[SamplePrompt(**s) for s in meta["samples"]],
        stop=() if is_text else TEMPLATE.stop_strings,
        key=folder.name,
        is_text=is_text,
        parts=tuple(
            DataPart(c.source, c.weight, int(start), int(size))
            for c, start, size in zip(components, starts, sizes, strict=True)
        ),
    )
    log.info(
        "data: %s training and %s validation %s (%s tokens) from %s, ready in %.2f s",
        f"{len(data.train):,}",
        f"{len(data.val):,}",
        "windows" if is_text else "examples",
        f"{len(data.train.tokens):,}",
        config.data.source,
        time.perf_counter() - started,
    )
    return data


@dataclass(frozen=True)
class _Source:
    """One source: what identifies it for the caches, and its training and validation splits (read at most
    once, and only when a cache misses)."""

    config: Config  # data.source is this one source
    is_text: bool
    identity: dict[str, Any]
    splits: Callable[[], tuple[list[Any], list[Any]]]

    @classmethod
    def read(cls, config: Config) -> _Source:
        d, seed = config.data, config.train.seed
        if is_text_source(d.source):

            @functools.cache
            def text_splits() -> tuple[list[Any], list[Any]]:
                return split_documents(read_documents(d), val_fraction=d.val_fraction)

            identity = {"source": text_fingerprint(d), "split": {"val_fraction": d.val_fraction}}
            return cls(config, True, identity, text_splits)
        size = d.dataset_size + validation_size(d.dataset_size, d.val_fraction)

        @functools.cache
        def record_splits() -> tuple[list[Any], list[Any]]:
            records = load_records(d.source, synthetic_size=size, seed=seed)
            s = split_records(records, dataset_size=d.dataset_size, val_fraction=d.val_fraction, seed=seed)
            return s.train, s.val

        identity = {
            "source": records_fingerprint(d.source, synthetic_size=size, seed=seed),
            "split": {"dataset_size": d.dataset_size, "val_fraction": d.val_fraction, "seed": seed},
        }
        return cls(config, False, identity, record_splits)

    def texts(self) -> Iterable[str]:
        """The training split as the model will see it, so a trained BPE also learns the template's headers."""
        if self.is_text:
            return self.splits()[0]
        return (
            TEMPLATE.render(t.instruction, t.context, t.response) for r in self.splits()[0] for t in r.turns
        )

    def tokenized(self, tokenizer: Tokenizer) -> tuple[Path, dict[str, Any]]:
        """The cache entry of this source's tokenized splits (built on a miss) and its metadata."""
        d = self.config.data
        key = {
            "kind": "text" if self.is_text else "instructions",
            **self.identity,
            "tokenizer": digest(tokenizer.to_dict()),
            "max_seq_length": self.config.model.max_seq_length,
            "samples": [SAMPLE_PROMPTS, SAMPLE_TOKENS, TEXT_PROMPT_TOKENS],
        }
        if not self.is_text:
            key.update(template=TEMPLATE.version, train_on_prompt=d.train_on_prompt)
        build = _build_text if self.is_text else _build_instructions
        return load_or_build("tokens", key, lambda out: build(out, self.config, tokenizer, self.splits))


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
            "ids": TEMPLATE.encode_chat(
                tokenizer, r.history, r.instruction, r.context, max_prompt_tokens=budget
            ).ids,
        }
        for r in val[:SAMPLE_PROMPTS]
    ]
    return {"samples": samples}


def _build_mixture(out: Path, entries: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    train = [TokenArrays.load(folder, "train") for folder, _ in entries]
    TokenArrays.concatenate(train).save(out, "train")
    TokenArrays.concatenate([TokenArrays.load(folder, "val") for folder, _ in entries]).save(out, "val")
    # The sources' sample prompts in turn, so each shows at evaluations.
    rounds = itertools.zip_longest(*(meta["samples"] for _, meta in entries))
    samples = [s for samples in rounds for s in samples if s is not None][:SAMPLE_PROMPTS]
    return {"samples": samples, "train_sizes": [len(t) for t in train]}


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
