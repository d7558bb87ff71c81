"""Tokenizers (exact GPT-2, a trained byte-level BPE, raw bytes) behind one small interface.

Each tokenizer saves itself as plain Python data (`to_dict`), so a checkpoint alone rebuilds it and
`torch.load(weights_only=True)` can read it back. `encode` treats "<|endoftext|>" in its input as ordinary
text, so user input can never inject the end-of-text token; only the code that joins documents adds `eos_id`.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import tiktoken
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
# The longest pre-token a trained BPE sees, in bytes (see `_train_bpe`); part of a trained tokenizer's
# cache key, since changing it changes what training makes.
BPE_MAX_WORD = 64
GPT2_RANKS_ENV = "TINYLM_GPT2_TIKTOKEN"
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/gpt2.tiktoken"
DEFAULT_BPE_VOCAB_SIZE = 8192

# Copied from tiktoken_ext/openai_public.py (r50k_pat_str): GPT-2's split regex with possessive quantifiers,
# which split the same way but cannot backtrack catastrophically on long runs of whitespace.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_GPT2_MERGEABLE = 50256  # ranks 0..50255; <|endoftext|> is 50256
_BYTE_EOS_ID = 256


class TokenizerError(ValueError):
    """A one-line, user-facing problem: a missing ranks file, an unknown kind, a bad saved state."""


class Tokenizer(ABC):
    """What the data pipeline, the model's vocabulary and generation need from any tokenizer."""

    kind: ClassVar[str]
    vocab_size: int  # rows the model's embedding needs
    eos_id: int  # id of <|endoftext|>

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a literal "<|endoftext|>" in it is ordinary text, never `eos_id`."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; incomplete UTF-8 (e.g. half an emoji) becomes U+FFFD rather than raising."""

    @abstractmethod
    def to_dict(self) -> dict:
        """Everything needed to rebuild this tokenizer, as JSON-compatible data."""

    @abstractmethod
    def to_hf(self) -> tokenizers.Tokenizer:
        """The same tokenizer as a Hugging Face `tokenizers` object (what a tokenizer.json file holds), for
        export; in it, as in every Hugging Face tokenizer, "<|endoftext|>" in the text is the special token."""

    @abstractmethod
    def byte_lengths(self) -> list[int]:
        """How many bytes of UTF-8 text each id stands for (0 for end-of-text, which stands for none): what
        bits per byte divides by, so that models with different tokenizers compare."""


class GPT2Tokenizer(Tokenizer):
    """The exact GPT-2 BPE through tiktoken, so GPT-2's token ids (and pretrained weights) line up."""

    kind = "gpt2"

    def __init__(self, mergeable_ranks: dict[bytes, int]) -> None:
        self._ranks = mergeable_ranks
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=_GPT2_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens={EOS: _GPT2_MERGEABLE},
        )
        self.vocab_size = self._enc.n_vocab
        self.eos_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        _check_ids(ids, self)
        return self._enc.decode(ids, errors="replace")

    def to_dict(self) -> dict:
        # The ranks file's own text (~835 KB): a checkpoint then needs no file or network to rebuild it.
        by_rank = sorted(self._ranks.items(), key=lambda item: item[1])
        ranks = "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank)
        return {"kind": self.kind, "ranks": ranks}

    def to_hf(self) -> tokenizers.Tokenizer:
        # tiktoken merges the adjacent pair whose joined token ranks lowest; a BPE file lists merges in
        # priority order, so every way to split each token into two tokens, ordered by the joined token's
        # rank, makes the same choices (transformers converts tiktoken files the same way).
        text = _byte_level_text
        vocab = {text(token): rank for token, rank in self._ranks.items()}
        merges: list[tuple[str, str]] = []
        for token, _ in sorted(self._ranks.items(), key=lambda item: item[1]):
            splits = [(token[:i], token[i:]) for i in range(1, len(token))]
            splits = [(a, b) for a, b in splits if a in self._ranks and b in self._ranks]
            splits.sort(key=lambda pair: (self._ranks[pair[0]], self._ranks[pair[1]]))
            merges += [(text(a), text(b)) for a, b in splits]
        return _byte_level_bpe(vocab, merges, self.eos_id)

    def byte_lengths(self) -> list[int]:
        lengths = [len(token) for token, _ in sorted(self._ranks.items(), key=lambda item: item[1])]
        return [*lengths, 0]  # <|endoftext|> comes after the mergeable ranks


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained on the user's own corpus, for a vocabulary smaller than GPT-2's."""

    kind = "bpe"

    def __init__(self, tok: tokenizers.Tokenizer, *, eos: str = EOS) -> None:
        eos_id = tok.token_to_id(eos)
        if eos_id is None:
            raise TokenizerError(f"bpe tokenizer has no {eos} token")
        self.eos = eos
        # Without this, `encode` would turn a literal "<|endoftext|>" in user text into the special id. The
        # flag is not part of the saved JSON, so it is set here, on every construction path.
        tok.encode_special_tokens = True
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(_replace_lone_surrogates(text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        _check_ids(ids, self)
        # Keep <|endoftext|> visible, as the gpt2 and byte tokenizers do.
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_dict(self) -> dict:
        # A model imported from Hugging Face may end its texts with another token than <|endoftext|>.
        eos = {} if self.eos == EOS else {"eos": self.eos}
        return {"kind": self.kind, "json": self._tok.to_str(), **eos}

    def to_hf(self) -> tokenizers.Tokenizer:
        return tokenizers.Tokenizer.from_str(self._tok.to_str())

    def byte_lengths(self) -> list[int]:
        # A byte-level vocabulary spells each byte as one character.
        lengths = [0] * self.vocab_size
        for token, index in self._tok.get_vocab(with_added_tokens=False).items():
            lengths[index] = len(token)
        lengths[self.eos_id] = 0
        return lengths


class ByteTokenizer(Tokenizer):
    """Raw UTF-8 bytes plus <|endoftext|>: the character-level recipe (nanoGPT's tiny Shakespeare)."""

    kind = "byte"
    vocab_size = 257
    eos_id = _BYTE_EOS_ID

    def encode(self, text: str) -> list[int]:
        return list(_replace_lone_surrogates(text).encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        _check_ids(ids, self)
        data = bytearray()
        for i in ids:
            if i == self.eos_id:
                data += EOS.encode("ascii")
            else:
                data.append(i)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    def to_hf(self) -> tokenizers.Tokenizer:
        # A byte-level BPE without merges: each byte's token id is the byte itself.
        vocab = {_byte_level_text(bytes([b])): b for b in range(256)}
        return _byte_level_bpe(vocab, [], self.eos_id)

    def byte_lengths(self) -> list[int]:
        return [1] * 256 + [0]


def build_tokenizer(
    kind: str,
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int | None = None,
    gpt2_ranks_path: str | None = None,
) -> Tokenizer:
    """Make a new tokenizer: `texts` and `vocab_size` train a bpe one, `gpt2_ranks_path` locates GPT-2's.

    Options a kind does not use (`texts` for gpt2, the ranks path for bpe) are ignored: one config serves all.
    """
    if kind == "gpt2":
        _check_fixed_vocab_size(kind, vocab_size, _GPT2_MERGEABLE + 1)
        return _load_gpt2(gpt2_ranks_path)
    if kind == "bpe":
        return _train_bpe(texts, DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size)
    if kind == "byte":
        _check_fixed_vocab_size(kind, vocab_size, ByteTokenizer.vocab_size)
        return ByteTokenizer()
    raise TokenizerError(f"unknown tokenizer {kind!r} (choose gpt2, bpe or byte)")


def tokenizer_from_dict(state: dict) -> Tokenizer:
    """Rebuild the tokenizer that `to_dict` saved (e.g. into a checkpoint)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer(_parse_gpt2_ranks(_saved_field(state, "ranks"), source="saved gpt2 tokenizer"))
    if kind == "bpe":
        try:
            tok = tokenizers.Tokenizer.from_str(_saved_field(state, "json"))
        except Exception as exc:  # `tokenizers` raises bare Exception for bad JSON
            raise TokenizerError(f"saved bpe tokenizer is not valid tokenizer JSON: {exc}") from exc
        eos = state.get("eos", EOS)
        if not isinstance(eos, str):
            raise TokenizerError(f"saved bpe tokenizer has an end-of-text token of type {type(eos).__name__}")
        return BPETokenizer(tok, eos=eos)
    if kind == "byte":
        return ByteTokenizer()
    raise TokenizerError(f"saved tokenizer has unknown kind {kind!r} (expected gpt2, bpe or byte)")


def _load_gpt2(ranks_path: str | None) -> GPT2Tokenizer:
    """GPT-2 from, in order: `ranks_path`, $TINYLM_GPT2_TIKTOKEN, then tiktoken's own download or cache."""
    path = ranks_path or os.environ.get(GPT2_RANKS_ENV)
    if path:
        file = Path(path).expanduser()
        try:
            text = file.read_bytes().decode("ascii")
        except OSError as exc:
            raise TokenizerError(f"cannot read GPT-2 ranks file {file}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"GPT-2 ranks file {file} is not a gpt2.tiktoken text file") from exc
        return GPT2Tokenizer(_parse_gpt2_ranks(text, source=str(file)))
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as exc:  # offline: requests, blobfile or a hash check can fail in many ways
        raise TokenizerError(
            f"GPT-2 tokenizer unavailable offline ({type(exc).__name__}): set {GPT2_RANKS_ENV} or the config "
            f"field data.gpt2_ranks_path to a gpt2.tiktoken ranks file (download it from {GPT2_RANKS_URL})"
        ) from exc
    return GPT2Tokenizer({enc.decode_single_token_bytes(rank): rank for rank in range(_GPT2_MERGEABLE)})


def _parse_gpt2_ranks(text: str, *, source: str) -> dict[bytes, int]:
    """Read tiktoken's ranks format ("base64token rank" per line) without tiktoken copying it to a cache."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            message = f"{source}:{number}: expected 'base64token rank', got {line[:60]!r}"
            raise TokenizerError(message) from exc
    if sorted(ranks.values()) != list(range(_GPT2_MERGEABLE)):
        raise TokenizerError(
            f"{source} is not GPT-2's ranks file: it needs {_GPT2_MERGEABLE} distinct tokens ranked "
            f"0..{_GPT2_MERGEABLE - 1}, it has {len(ranks)}"
        )
    return ranks


def _train_bpe(texts: Iterable[str] | None, vocab_size: int) -> BPETokenizer:
    """Train a GPT-2-style byte-level BPE: every byte is in the alphabet, so any text round-trips exactly."""
    if texts is None:
        raise TokenizerError("the bpe tokenizer needs texts to train on")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise TokenizerError(
            f"bpe vocab_size must be at least {len(alphabet) + 1} (256 bytes + {EOS}), got {vocab_size}"
        )
    if isinstance(texts, str):  # one string is an Iterable[str] of characters; the caller means one text
        texts = [texts]
    tok = tokenizers.Tokenizer(models.BPE())
    gpt2_words = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Training sees GPT-2's words cut into pieces of at most BPE_MAX_WORD bytes: it merges within each
    # word in time quadratic in the word's length, so one long run without a space (a minified file, a DNA
    # string) would take hours. Ordinary words are far shorter. Encoding splits as GPT-2 does (what
    # transformers and llama.cpp do with an exported tokenizer): its merges are fast on any word.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [gpt2_words, pre_tokenizers.Split(tokenizers.Regex(f".{{1,{BPE_MAX_WORD}}}"), behavior="isolated")]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet, show_progress=True
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.pre_tokenizer = gpt2_words
    return BPETokenizer(tok)


def _check_fixed_vocab_size(kind: str, vocab_size: int | None, fixed: int) -> None:
    """A vocab_size that the tokenizer cannot honour is a config mistake, not something to ignore."""
    if vocab_size is not None and vocab_size != fixed:
        raise TokenizerError(f"the {kind} tokenizer's vocab_size is fixed at {fixed}, got {vocab_size}")


def _check_ids(ids: Sequence[int], tokenizer: Tokenizer) -> None:
    """One clear error for ids outside the vocabulary (e.g. a padded embedding row), whatever the backend."""
    if len(ids) and not 0 <= min(ids) <= max(ids) < tokenizer.vocab_size:
        raise TokenizerError(
            f"token id out of range for the {tokenizer.kind} tokenizer (vocab_size {tokenizer.vocab_size}): "
            f"min {min(ids)}, max {max(ids)}"
        )


def _replace_lone_surrogates(text: str) -> str:
    """Lone surrogates (lax JSON, surrogateescape) have no UTF-8 form; make them U+FFFD as tiktoken does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _saved_field(state: dict, key: str) -> str:
    value = state.get(key)
    if not isinstance(value, str):
        raise TokenizerError(f"saved {state['kind']} tokenizer lacks its {key!r} field")
    return value


def tokenizer_from_hf(tok: tokenizers.Tokenizer, *, eos: str, source: str) -> Tokenizer:
    """A tinylm tokenizer for a Hugging Face one (a model imported with its tokenizer.json).

    GPT-2's own vocabulary, recognised by its shape (a byte-level BPE of 50,257 tokens ending in
    <|endoftext|>, merges in the order of the tokens they make), becomes the tiktoken-backed gpt2 tokenizer;
    any other is kept as it is, as a bpe tokenizer that ends texts with `eos`.
    """
    if tok.token_to_id(eos) is None:
        raise TokenizerError(f"{source}: the tokenizer has no end-of-text token {eos!r}")
    ranks = _gpt2_ranks_of(tok, eos)
    return GPT2Tokenizer(ranks) if ranks is not None else BPETokenizer(tok, eos=eos)


def _gpt2_ranks_of(tok: tokenizers.Tokenizer, eos: str) -> dict[bytes, int] | None:
    """tiktoken ranks that tokenize exactly as `tok`, when `tok` has GPT-2's shape; else None."""
    state = json.loads(tok.to_str())
    model, pre = state.get("model") or {}, state.get("pre_tokenizer") or {}
    gpt2_shaped = (
        model.get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and state.get("normalizer") is None
        and eos == EOS
        and tok.token_to_id(EOS) == _GPT2_MERGEABLE
        and tok.get_vocab_size(with_added_tokens=True) == _GPT2_MERGEABLE + 1
    )
    if not gpt2_shaped:
        return None
    to_byte = {char: byte for byte, char in _byte_chars().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in model["vocab"].items() if token != EOS}
    except KeyError:  # a character outside the byte-level alphabet
        return None
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    made = [model["vocab"].get(a + b, -1) for a, b in merges]
    in_rank_order = all(x <= y for x, y in itertools.pairwise(made)) and min(made, default=0) >= 0
    if sorted(ranks.values()) != list(range(_GPT2_MERGEABLE)) or not in_rank_order:
        return None
    return ranks


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet that byte-level BPE files are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level_text(token: bytes) -> str:
    chars = _BYTE_CHARS
    return "".join(chars[b] for b in token)


def _byte_level_bpe(
    vocab: dict[str, int], merges: list[tuple[str, str]], eos_id: int
) -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE over `vocab` and `merges`, with <|endoftext|> = eos_id as its special token."""
    tok = tokenizers.Tokenizer(models.BPE(vocab={**vocab, EOS: eos_id}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(EOS, special=True)])
    return tok


_BYTE_CHARS = _byte_chars()
