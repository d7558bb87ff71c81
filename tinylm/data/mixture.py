"""Several data sources in one run, each drawn by its weight, as nanochat mixes its tasks.

`--data "tinyshakespeare.txt:0.3,dolly.jsonl:0.7"` names the sources, each with an optional `:WEIGHT` (1 when
left out; the weights need not add up to 1). Every example of a step comes from a source drawn by the weights,
and each source walks through its own examples in a fresh shuffled order each time round it goes: a small
source with a large weight repeats within an epoch, a large one with a small weight is seen in part. Which
examples a step takes is a pure function of (seed, step), so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinylm.data.instructions import epoch_order
from tinylm.data.sources import DataError

# Steps whose per-source counts are drawn together from one seeded generator.
BLOCK_STEPS = 1024


@dataclass(frozen=True)
class Component:
    """One source of a mixture and its share of the examples (the weights are normalised to add up to 1)."""

    source: str
    weight: float


def parse_sources(spec: str) -> list[Component]:
    """`SOURCE[:WEIGHT],SOURCE[:WEIGHT],...` as components; a source alone has weight 1.

    A `:WEIGHT` is the text after the last colon when it reads as a number, so `hf:NAME` needs none.
    """
    items = [item.strip() for item in spec.split(",")]
    if not all(items):
        raise DataError(f"data.source {spec!r}: an empty source between commas")
    named: list[tuple[str, float]] = []
    for item in items:
        source, _, tail = item.rpartition(":")
        try:
            weight = float(tail) if source else math.nan
        except ValueError:
            weight = math.nan
        if math.isnan(weight):
            source, weight = item, 1.0
        source = source.strip()
        if not (math.isfinite(weight) and weight > 0):
            raise DataError(
                f"data.source {spec!r}: the weight of {source} must be a positive number, got {tail}"
            )
        if source in (s for s, _ in named):
            raise DataError(f"data.source {spec!r}: {source} is named twice")
        named.append((source, weight))
    total = sum(w for _, w in named)
    return [Component(source, weight / total) for source, weight in named]


@dataclass(frozen=True)
class DataPart:
    """One source's share of the training examples: they are examples[start : start + size]."""

    source: str
    weight: float
    start: int
    size: int


class MixtureOrder:
    """The training examples (indices) of each step of a mixture: a pure function of (seed, step).

    A step's `per_step` examples are split over the sources by a multinomial draw with the weights, from a
    generator seeded by (seed, block of steps); a source's k-th draw over the run is its example at k in
    the sequence of its shuffled epochs. Counting the draws before a step replays the blocks before it once
    (memoised), so stepping on costs nothing and a resume far into a run a fraction of a second.
    """

    def __init__(self, parts: Sequence[DataPart], *, seed: int, per_step: int):
        if any(p.size < 1 for p in parts):
            empty = next(p.source for p in parts if p.size < 1)
            raise DataError(f"{empty}: no training examples to mix in")
        self.parts = list(parts)
        self.seed = seed
        self.per_step = per_step
        self.weights = np.array([p.weight for p in parts], dtype=np.float64)
        self.weights /= self.weights.sum()
        # _before[b]: each source's draws in the blocks before block b.
        self._before = [np.zeros(len(parts), dtype=np.int64)]
        self._block: tuple[int, np.ndarray] = (-1, np.zeros(0))
        self._orders: dict[int, tuple[int, list[int]]] = {}

    def _counts(self, block: int) -> np.ndarray:
        """(BLOCK_STEPS, sources): how many examples each step of the block takes from each source."""
        if self._block[0] != block:
            rng = np.random.default_rng([self.seed, block])
            self._block = (block, rng.multinomial(self.per_step, self.weights, size=BLOCK_STEPS))
        return self._block[1]

    def _drawn_before(self, block: int) -> np.ndarray:
        while len(self._before) <= block:
            b = len(self._before) - 1
            self._before.append(self._before[b] + self._counts(b).sum(axis=0))
        return self._before[block]

    def _order(self, source: int, epoch: int) -> list[int]:
        if self._orders.get(source, (-1,))[0] != epoch:
            # Each (source, epoch) its own shuffle: sources never share an order.
            order = epoch_order(
                self.parts[source].size, seed=self.seed, epoch=epoch * len(self.parts) + source
            )
            self._orders[source] = (epoch, order)
        return self._orders[source][1]

    def __call__(self, step: int) -> list[int]:
        block, within = divmod(step, BLOCK_STEPS)
        before = self._drawn_before(block)
        counts = self._counts(block)
        first = before + counts[:within].sum(axis=0)
        chosen: list[int] = []
        for source, part in enumerate(self.parts):
            for k in range(int(first[source]), int(first[source] + counts[within, source])):
                epoch, position = divmod(k, part.size)
                chosen.append(part.start + self._order(source, epoch)[position])
        return chosen
