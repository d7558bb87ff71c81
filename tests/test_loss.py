"""The training loss: the chunked output layer + cross-entropy equals the plain one, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from tinylm.loss import linear_cross_entropy, lm_loss
from tinylm.model import IGNORE_INDEX

VOCAB = 257


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_linear_cross_entropy_equals_the_full_one_with_its_gradients(bias, chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=g, requires_grad=True)
    b = torch.randn(VOCAB, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, VOCAB, (40,), generator=g)
    params = [p for p in (hidden, weight, b) if p is not None]

    full = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    expected = torch.autograd.grad(full * 0.5, params)
    chunked = linear_cross_entropy(hidden, weight, b, targets, chunk_size=chunk_size)
    got = torch.autograd.grad(chunked * 0.5, params)

    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_chunked_loss_stays_exact_when_the_target_probability_underflows():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[200.0, 0.0], [0.0, 0.0], [-200.0, 5.0]], requires_grad=True)
    targets = torch.tensor([2, 1])  # row 0's target is 400 nats below its best logit: exp underflows
    full = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    chunked = linear_cross_entropy(hidden, weight, None, targets, chunk_size=1)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6) and chunked.item() > 400


def test_chunked_loss_over_no_targets_gives_zero_gradients_not_none():
    hidden = torch.randn(0, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    bias = torch.randn(VOCAB, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, bias, torch.zeros(0, dtype=torch.long), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_chunked_loss_without_gradients_computes_none(tiny_model):
    model = tiny_model().eval()
    inputs, targets = torch.randint(0, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        chunked, n = lm_loss(model, inputs, targets, chunk_size=4)
    assert n == 20 and not chunked.requires_grad
    assert chunked.item() == pytest.approx(lm_loss(model, inputs, targets)[0].item(), rel=1e-6)


def test_masked_positions_loss_equals_the_loss_over_full_logits(tiny_model):
    model = tiny_model()
    inputs = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    targets[:, :8] = IGNORE_INDEX  # a masked prompt
    targets[2, 15:] = IGNORE_INDEX  # padding
    full = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
    for chunk_size in (0, 5):
        loss, n = lm_loss(model, inputs, targets, chunk_size=chunk_size)
        assert n == int((targets != IGNORE_INDEX).sum())
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)
