"""The CPU kernels the model calls: dropout with a faster mask, and attention with dropout."""

import pytest
import torch
import torch.nn.functional as F

from tinylm.kernels import attention, dropout
from tinylm.loss import lm_loss

VOCAB = 257


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_drops_p_scales_the_rest_and_masks_the_gradient(dtype):
    torch.manual_seed(0)
    x = torch.ones(400_000, dtype=dtype, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert y.dtype == dtype
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.002)  # 400,000 draws: sd 0.0005
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.9))
    g = torch.randn(400_000).to(dtype)
    y.backward(g)
    assert torch.equal(x.grad, g * kept.to(dtype) * torch.tensor(1 / 0.9, dtype=dtype))


def test_fast_dropout_follows_the_seed_and_is_the_identity_when_off():
    x = torch.randn(3, 5, 7)
    torch.manual_seed(1)
    a = dropout(x, 0.5, True)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.5, True), a)
    assert not torch.equal(dropout(x, 0.5, True), a)
    assert dropout(x, 0.5, False) is x
    assert dropout(x, 0.0, True) is x


@pytest.mark.parametrize("packed", [False, True])
def test_explicit_attention_without_drops_is_sdpa(packed):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    mask = None
    if packed:
        segments = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
        mask = (torch.ones(10, 10, dtype=torch.bool).tril() & (segments[:, :, None] == segments[:, None, :]))[
            :, None
        ]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    # A rate so small that no element is dropped still runs the explicit CPU path, which must equal SDPA.
    torch.testing.assert_close(attention(q, k, v, mask, dropout_p=1e-9), expected)


def test_training_drops_attention_weights_reproducibly(tiny_model):
    model = tiny_model(dropout=0.3).train()
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    a = model(idx)
    torch.manual_seed(5)
    assert torch.equal(model(idx), a)
    assert not torch.allclose(model.eval()(idx), a)


def test_checkpointing_redraws_the_same_dropout_masks_so_gradients_match(tiny_model):
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(dropout=0.3, gradient_checkpointing=checkpointing).train()
        torch.manual_seed(7)
        loss, _ = lm_loss(model, idx[:, :-1], idx[:, 1:], chunk_size=8)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)
