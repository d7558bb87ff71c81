"""The training loss: cross-entropy over the positions whose target counts, with the output layer folded in.

The output layer is most of a small model's work, so the loss applies it only where a target counts, and
(with chunk_size > 0) a chunk of rows at a time with each chunk's gradient taken at once, never holding
the whole (rows, vocabulary) logits. `TinyLM.logits` stays the plain output layer for everything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinylm.model import IGNORE_INDEX, TinyLM


def lm_loss(
    model: TinyLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    chunk_size: int = 0,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over targets that count (not IGNORE_INDEX), and how many there were.

    The 50,257-wide output layer is applied only at those positions: prompt tokens masked out of the loss
    cost nothing there. With chunk_size > 0 it runs `chunk_size` positions at a time and never holds all
    their logits (see `linear_cross_entropy`). Returning the sum lets the caller normalise over a whole
    accumulated batch.
    """
    hidden = model.hidden_states(inputs, positions=positions, segments=segments)
    keep = targets != IGNORE_INDEX
    hidden, wanted = hidden[keep], targets[keep]
    if chunk_size > 0:
        loss = linear_cross_entropy(hidden, model.head.weight, model.head.bias, wanted, chunk_size=chunk_size)
    else:
        loss = F.cross_entropy(model.logits(hidden).float(), wanted, reduction="sum")
    return loss, wanted.numel()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    chunk_size: int,
) -> torch.Tensor:
    """sum(cross_entropy(hidden @ weight.T + bias, targets)) for hidden (N, d), weight (V, d), targets (N,).

    The output layer and the loss run `chunk_size` rows at a time, and each chunk's gradient is taken at once,
    so no (N, V) logits tensor is ever held: with V = 50,257 that is the largest tensor of a step. Matrix work
    follows the active autocast dtype (bfloat16 where the trainer enables it). The softmax is computed in
    float32 and stored in that dtype; the loss is summed in float32 from those probabilities (under bfloat16,
    each token's term is within 0.4% of its float32 value and the rounding averages out over a batch).
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when a gradient is wanted, the gradients too, chunk by chunk; backward
    only scales them by the incoming gradient. One pass over the logits instead of forward + recompute."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, dtype):
        h, w = hidden.to(dtype), weight.to(dtype)
        # The bias rides in the product as one more weight column against a column of ones: an addmm's
        # separate bias pass over the (chunk, V) logits was measurably slower (docs/benchmarks.md).
        h_ext, w_ext = (h, w)
        if bias is not None:
            h_ext = torch.cat([h, h.new_ones(h.size(0), 1)], dim=1)
            w_ext = torch.cat([w, bias.to(dtype)[:, None]], dim=1)
        want_grad = any(ctx.needs_input_grad[:3])
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = grad_bias = None  # float32 sums over the chunks, started by the first
        for start in range(0, h.size(0), chunk_size):
            rows, wanted = slice(start, start + chunk_size), targets[start : start + chunk_size]
            logits = h_ext[rows] @ w_ext.t()  # (chunk, V)
            # One pass: the softmax runs in float32 whatever the storage dtype, so a bfloat16 result is the
            # float32 softmax rounded once, as the gradient would be anyway.
            probs = torch.softmax(logits, dim=1)
            log_picked = probs.gather(1, wanted[:, None]).squeeze(1).float().log()
            # A probability below 1e-30 may have underflowed: take those rows' log-probability exactly.
            tiny = log_picked < -69.0
            if tiny.any():
                exact = logits[tiny].float()
                log_picked[tiny] = exact.gather(1, wanted[tiny, None]).squeeze(1) - exact.logsumexp(1)
            loss -= log_picked.sum()
            del logits
            if not want_grad:
                continue
            # d(loss)/d(logits) = softmax - one_hot(target), in place.
            probs[torch.arange(probs.size(0), device=probs.device), wanted] -= 1.0
            if bias is not None:
                # A (1, chunk) x (chunk, V) product sums the rows faster than probs.sum(0) (docs/benchmarks.md).
                grad_bias = _accumulate(grad_bias, (probs.new_ones(1, probs.size(0)) @ probs).squeeze(0))
            assert grad_hidden is not None
            grad_hidden[rows] = probs @ w
            grad_weight = _accumulate(grad_weight, probs.t() @ h[rows])
        if want_grad and grad_weight is None:
            # No counted target (a process whose share of a step has none): zero gradients, not None, so
            # DDP still sees every parameter's gradient arrive.
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
            grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        del ctx.grads
        # In place: these buffers are this function's own, and a fresh 50,257-row copy costs page faults.
        scaled = [None if g is None else g.mul_(grad_loss) for g in (grad_hidden, grad_weight, grad_bias)]
        return scaled[0], scaled[1], scaled[2], None, None, None


def _accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """total + part in float32; the first part starts the total, so there is no zero-filled buffer to add to."""
    return part.float() if total is None else total.add_(part)
