"""Tokenized examples as flat arrays that live on disk and are memory-mapped, not held as Python lists.

One layout serves both kinds of data: instruction records (one example per record, with a loss mask) and
plain text (overlapping max_seq_length + 1 windows of one token stream, every target counting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinylm.data.instructions import collate
from tinylm.prompts import EncodedExample


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page cache for every vocabulary up to GPT-2's 50,257."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass(frozen=True)
class TokenArrays:
    """Example i is tokens[starts[i] : starts[i] + lengths[i]]; mask (same length as tokens) says which
    tokens are prediction targets, and None means all of them (plain text)."""

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray | None = None

    @classmethod
    def from_examples(cls, examples: Sequence[EncodedExample], *, vocab_size: int) -> TokenArrays:
        lengths = np.array([len(e.tokens) for e in examples], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        tokens = np.fromiter(
            (t for e in examples for t in e.tokens), dtype=token_dtype(vocab_size), count=int(lengths.sum())
        )
        mask = np.fromiter((m for e in examples for m in e.loss_mask), dtype=bool, count=len(tokens))
        return cls(tokens=tokens, starts=starts, lengths=lengths, mask=mask)

    @classmethod
    def windows(cls, stream: np.ndarray, *, max_seq_length: int) -> TokenArrays:
        """Consecutive windows of max_seq_length + 1 tokens that share their boundary token, so every
        token of the stream but the first is a target exactly once."""
        count = max(0, (len(stream) - 1) // max_seq_length)
        starts = np.arange(count, dtype=np.int64) * max_seq_length
        lengths = np.full(count, max_seq_length + 1, dtype=np.int64)
        return cls(tokens=stream, starts=starts, lengths=lengths)

    @classmethod
    def concatenate(cls, parts: Sequence[TokenArrays]) -> TokenArrays:
        """The examples of every part, in order (a mixture's sources); plain text gets an all-true mask when
        it joins instruction examples."""
        offsets = np.cumsum([0, *(len(p.tokens) for p in parts[:-1])])
        masks = [p.mask for p in parts]
        mask = None
        if any(m is not None for m in masks):
            mask = np.concatenate(
                [np.ones(len(p.tokens), bool) if m is None else m for p, m in zip(parts, masks, strict=True)]
            )
        return cls(
            tokens=np.concatenate([p.tokens for p in parts]),
            starts=np.concatenate([p.starts + offset for p, offset in zip(parts, offsets, strict=True)]),
            lengths=np.concatenate([p.lengths for p in parts]),
            mask=mask,
        )

    def __len__(self) -> int:
        return len(self.starts)

    def example(self, index: int) -> EncodedExample:
        start, end = int(self.starts[index]), int(self.starts[index] + self.lengths[index])
        tokens = self.tokens[start:end].tolist()
        mask = [True] * len(tokens) if self.mask is None else self.mask[start:end].tolist()
        return EncodedExample(tokens=tokens, loss_mask=mask)

    def batch(self, indices: Sequence[int], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of these examples, right-padded to the longest one."""
        return collate([self.example(int(i)) for i in indices], pad_id)

    def save(self, folder: Path, name: str) -> None:
        np.save(folder / f"{name}.tokens.npy", self.tokens)
        np.save(folder / f"{name}.starts.npy", self.starts)
        np.save(folder / f"{name}.lengths.npy", self.lengths)
        if self.mask is not None:
            np.save(folder / f"{name}.mask.npy", self.mask)

    @classmethod
    def load(cls, folder: Path, name: str) -> TokenArrays:
        """Memory-mapped: opening is instant whatever the size, and pages load as batches touch them."""

        def open_array(part: str) -> np.ndarray:
            return np.load(folder / f"{name}.{part}.npy", mmap_mode="r")

        mask_path = folder / f"{name}.mask.npy"
        return cls(
            tokens=open_array("tokens"),
            starts=open_array("starts"),
            lengths=open_array("lengths"),
            mask=open_array("mask") if mask_path.exists() else None,
        )
