"""Instruction data for training: seeded selection and split, tokenization through the prompt template,
and micro-batches whose order is a pure function of (seed, epoch) so a run can resume mid-epoch.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tinylm.data.sources import DataError, Record
from tinylm.model import IGNORE_INDEX
from tinylm.prompts import TEMPLATE, EncodedExample, TextTokenizer


@dataclass(frozen=True)
class Splits:
    train: list[Record]
    val: list[Record]


def validation_size(dataset_size: int, val_fraction: float) -> int:
    return max(1, round(dataset_size * val_fraction))


def split_records(records: Sequence[Record], *, dataset_size: int, val_fraction: float, seed: int) -> Splits:
    """`dataset_size` training records after a seeded shuffle, and a validation split of
    `val_fraction` x that many taken from the records after them.

    So the v2 plan holds: 10,000 training records at effective batch 16 is 625 steps an epoch. A source with
    too few records gives up its last share to validation instead. A validation record whose prompt also
    occurs in training is dropped, so held-out really means unseen.
    """
    chosen = list(records)
    random.Random(seed).shuffle(chosen)
    n_val = validation_size(dataset_size, val_fraction)
    n_train = dataset_size
    if len(chosen) < n_train + n_val:
        n_val = validation_size(len(chosen), val_fraction)
        n_train = len(chosen) - n_val
    if n_train < 1:
        raise DataError(f"only {len(chosen)} record(s): too few to hold out a validation split")
    train, val = chosen[:n_train], chosen[n_train : n_train + n_val]
    seen = {r.prompt for r in train}
    val = [r for r in val if r.prompt not in seen]
    if not val:
        raise DataError("the validation split is empty after removing prompts that also occur in training")
    return Splits(train=train, val=val)


def encode_records(
    tokenizer: TextTokenizer, records: Iterable[Record], *, max_seq_length: int, train_on_prompt: bool
) -> list[EncodedExample]:
    return [
        TEMPLATE.encode_conversation(
            tokenizer, r.turns, max_seq_length=max_seq_length, train_on_prompt=train_on_prompt
        )
        for r in records
    ]


def collate(examples: Sequence[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example; inputs are tokens[:-1], targets tokens[1:] where the loss counts."""
    length = max(len(e.tokens) for e in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.tokens) - 1
        tokens, mask = example_tensors(e)
        inputs[row, :n] = tokens[:-1]
        targets[row, :n] = torch.where(mask[1:], tokens[1:], IGNORE_INDEX)
    return inputs, targets


def example_tensors(example: EncodedExample) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, loss mask) as tensors, made through numpy, which reads a list several times faster than
    `torch.tensor` does."""
    tokens = torch.from_numpy(np.asarray(example.tokens, dtype=np.int64))
    return tokens, torch.from_numpy(np.asarray(example.loss_mask, dtype=bool))


def epoch_order(n_examples: int, *, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: the same for the same (seed, epoch), whatever happened before."""
    order = list(range(n_examples))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order
