"""The micro-batches of one optimizer step: one example per row (right-padded), or several packed per row.

Packing puts a step's examples into as few `max_seq_length` rows as fit (first-fit decreasing), instead of
padding every example to the longest one. Each packed example keeps its own positions (restarting at 0) and
attends only within itself (`segments` drive a block-diagonal causal mask in the model), so its logits are
those it would have alone: packing changes how much padding is computed, not what is learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinylm.data.instructions import collate, example_tensors
from tinylm.model import IGNORE_INDEX
from tinylm.prompts import EncodedExample

PAD_SEGMENT = -1


@dataclass(frozen=True)
class Batch:
    """Model inputs and loss targets (B, T); positions and segments (B, T) only for packed rows."""

    inputs: torch.Tensor
    targets: torch.Tensor
    # Real (not padding) input tokens, for tokens/s.
    n_tokens: int
    positions: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        move = [None if t is None else t.to(device) for t in (self.positions, self.segments)]
        return Batch(self.inputs.to(device), self.targets.to(device), self.n_tokens, *move)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the items of each row, first-fit decreasing: longest first, each into the first row with
    room. Deterministic for the same lengths (ties keep their order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[index] > capacity:
            raise ValueError(f"an example of {lengths[index]} tokens does not fit a row of {capacity}")
        row = next((r for r, free in enumerate(room) if lengths[index] <= free), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def packed_batch(rows: Sequence[Sequence[EncodedExample]], pad_id: int) -> Batch:
    """Rows of examples laid end to end; inputs are each example's tokens[:-1], targets its tokens[1:]."""
    width = max(sum(len(e.tokens) - 1 for e in row) for row in rows)
    shape = (len(rows), width)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, PAD_SEGMENT, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for segment, e in enumerate(row):
            n = len(e.tokens) - 1
            span = slice(start, start + n)
            tokens, mask = example_tensors(e)
            inputs[r, span] = tokens[:-1]
            targets[r, span] = torch.where(mask[1:], tokens[1:], IGNORE_INDEX)
            positions[r, span] = torch.arange(n)
            segments[r, span] = segment
            start += n
    return Batch(inputs, targets, int((segments != PAD_SEGMENT).sum()), positions, segments)


def step_micro_batches(
    examples: Sequence[EncodedExample], *, pad_id: int, packing: bool, row_capacity: int, micro_rows: int
) -> list[Batch]:
    """The micro-batches of one optimizer step, each of at most `micro_rows` rows.

    Without packing each example is a row, right-padded to the longest of its micro-batch (the seed's way).
    """
    lengths = [len(e.tokens) - 1 for e in examples]
    if packing:
        rows = [[examples[i] for i in row] for row in pack_rows(lengths, row_capacity)]
        return [packed_batch(rows[i : i + micro_rows], pad_id) for i in range(0, len(rows), micro_rows)]
    return [
        Batch(*collate(examples[i : i + micro_rows], pad_id), sum(lengths[i : i + micro_rows]))
        for i in range(0, len(examples), micro_rows)
    ]
