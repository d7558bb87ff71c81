"""Packing: a step's examples share rows without seeing each other, and each keeps its own loss."""

import pytest
import torch

from tinylm.data.packing import PAD_SEGMENT, pack_rows, packed_batch, step_micro_batches
from tinylm.model import IGNORE_INDEX, TinyLM
from tinylm.prompts import EncodedExample

VOCAB = 257


def example(length: int, prompt: int, seed: int) -> EncodedExample:
    tokens = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return EncodedExample(tokens=tokens, loss_mask=[i >= prompt for i in range(length)])


def test_pack_rows_places_every_item_once_within_capacity():
    lengths = [60, 10, 35, 30, 64, 5, 20, 41]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == 5  # the fewest rows that can hold 265 tokens
    with pytest.raises(ValueError, match="65 tokens does not fit a row of 64"):
        pack_rows([65], 64)


def test_packed_rows_restart_positions_and_keep_each_examples_loss_mask():
    a, b = example(10, prompt=4, seed=1), example(6, prompt=2, seed=2)
    batch = packed_batch([[a, b]], pad_id=0)
    assert batch.inputs[0].tolist() == a.tokens[:-1] + b.tokens[:-1]
    assert batch.positions[0].tolist() == list(range(9)) + list(range(5))
    assert batch.segments[0].tolist() == [0] * 9 + [1] * 5
    assert batch.targets[0].tolist() == [IGNORE_INDEX] * 3 + a.tokens[4:] + [IGNORE_INDEX] + b.tokens[2:]
    assert batch.n_tokens == 14 and batch.n_targets == 6 + 4
    shorter = packed_batch([[a, b], [b]], pad_id=0)
    assert shorter.segments[1].tolist() == [0] * 5 + [PAD_SEGMENT] * 9


def packed_logits(model: TinyLM, rows: list[list[EncodedExample]]) -> torch.Tensor:
    batch = packed_batch(rows, pad_id=0)
    return model(batch.inputs, positions=batch.positions, segments=batch.segments)


def test_a_packed_example_has_the_logits_it_has_alone(tiny_model, arch):
    model = tiny_model(**arch).eval()
    examples = [example(n, prompt=3, seed=n) for n in (20, 12, 25, 7)]
    with torch.no_grad():
        packed = packed_logits(model, [examples])[0]
        start = 0
        for e in examples:
            alone = model(torch.tensor([e.tokens[:-1]]))[0]
            torch.testing.assert_close(packed[start : start + len(alone)], alone, rtol=0, atol=1e-5)
            start += len(alone)


def test_changing_one_packed_example_leaves_the_others_logits_unchanged(tiny_model):
    model = tiny_model().eval()
    first, second, third = example(20, 3, seed=1), example(15, 3, seed=2), example(18, 3, seed=3)
    changed = EncodedExample(tokens=[(t + 1) % VOCAB for t in second.tokens], loss_mask=second.loss_mask)
    with torch.no_grad():
        before = packed_logits(model, [[first, second, third]])[0]
        after = packed_logits(model, [[first, changed, third]])[0]
    mine = torch.cat([torch.arange(0, 19), torch.arange(33, 50)])  # first's and third's positions
    assert torch.equal(before[mine], after[mine])
    assert not torch.allclose(before[19:33], after[19:33])


def test_micro_batches_of_a_step_hold_every_example_once():
    examples = [example(n, prompt=2, seed=n) for n in (30, 5, 60, 12, 40, 22, 9, 50)]
    for packing in (False, True):
        batches = step_micro_batches(examples, pad_id=0, packing=packing, row_capacity=64, micro_rows=2)
        assert all(b.inputs.size(0) <= 2 for b in batches)
        assert sum(b.n_tokens for b in batches) == sum(len(e.tokens) - 1 for e in examples)
        assert sum(b.n_targets for b in batches) == sum(sum(e.loss_mask[1:]) for e in examples)
    packed = step_micro_batches(examples, pad_id=0, packing=True, row_capacity=64, micro_rows=100)
    assert sum(b.inputs.size(0) for b in packed) < len(examples)
