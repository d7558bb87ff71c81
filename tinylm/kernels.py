"""Hand-written fast paths for CPU training that the model calls: dropout and attention with dropout.

They exist because PyTorch's CPU versions were measured to cost a large share of a training step (see
docs/benchmarks.md, "Training throughput"); CUDA and MPS keep PyTorch's own kernels. Each is checked
against the PyTorch operation it replaces in tests/test_kernels.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, with the mask drawn faster on CPU.

    PyTorch's CPU dropout draws one Bernoulli sample per element, which made dropout a large share of a CPU
    training step (docs/benchmarks.md, "Training throughput"). Here each element compares a 16-bit quarter
    of a random 64-bit integer with a threshold: the same seeded generator, keep probability 1 - p to within
    2^-17, and the mask kept in x's dtype with the 1 / (1 - p) scale folded in, so backward is one multiply.
    Other devices keep PyTorch's fused kernel.
    """
    if not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= round(p * 2**16) - 2**15
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """`nn.Dropout` through `dropout` above."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, dropout_p: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_k)) v for q (B, nh, T, dk) and k, v (B, nh, S, dk); mask None means causal for a
    square prefill (T == S) and no mask for new tokens after a cache. dropout_p > 0 drops attention weights.

    SDPA everywhere, except CPU training with dropout: SDPA's fused CPU kernel has no dropout, and its fallback
    draws PyTorch's slow mask over every attention matrix, so that case runs the explicit products with
    `dropout`'s faster mask.
    """
    T, S = q.size(2), k.size(2)
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and T > 1
        )
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # scaling q is T / d_k times cheaper
    allowed = mask if mask is not None else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    weights = scores.masked_fill_(~allowed, float("-inf")).softmax(dim=-1)
    return dropout(weights, dropout_p, True) @ v
