"""The decoder-only transformer, read top-down: positions, attention, feed-forward, block, model, loss.

The model is pure: token ids in, logits out. No device choice, printing or I/O lives here. Decoding passes
an explicit `KVCache`; the loss is a separate function so it can skip positions whose loss does not count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinylm.config import ModelConfig

IGNORE_INDEX = -100


class KVCache:
    """Each row's window of tokens and every layer's keys and values for it, preallocated to max_seq_length.

    Rows are right-aligned: every window ends at column `length`, and row r's starts at column `starts[r]`
    (the columns before it are left padding that attention skips). A row's positions count from its own
    first token, so it gets the logits it would get alone. Rows leave a live batch with `keep` and join it
    with `join`. The window rule lives here too: a window holds at most max_seq_length tokens (a longer
    prompt keeps its end), and a full window jumps forward to its last three quarters (`next_windows`).
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, *, device: torch.device | str, dtype: torch.dtype
    ):
        shape = (config.n_layers, batch_size, config.n_heads, config.max_seq_length, config.d_k)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch_size, config.max_seq_length, dtype=torch.long, device=device)
        self.capacity = config.max_seq_length
        self.length = 0
        self.starts = [0] * batch_size
        self._starts = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1), on the device

    @property
    def batch_size(self) -> int:
        return len(self.starts)

    def prefill_ids(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """The prompts as one right-aligned (B, longest) id matrix for the first forward into this empty
        cache, each cut to its last max_seq_length tokens; records where each row starts."""
        if self.length or len(prompts) != self.batch_size:
            raise ValueError(f"prefill_ids wants an empty cache and {self.batch_size} prompts")
        windows = [list(p[-self.capacity :]) for p in prompts]
        longest = max(map(len, windows))
        ids = torch.zeros(self.batch_size, longest, dtype=torch.long)
        for row, window in enumerate(windows):
            ids[row, longest - len(window) :] = torch.tensor(window, dtype=torch.long)
        self._set_starts([longest - len(w) for w in windows])
        return ids.to(self.tokens.device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values (B, nh, T, dk) and return all of them so far."""
        end = self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} tokens exceed the context window of {self.capacity}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, idx: torch.Tensor) -> None:
        """Record the token ids (B, T) whose keys and values every layer has just appended."""
        self.tokens[:, self.length : self.length + idx.size(1)] = idx
        self.length += idx.size(1)

    def positions(self, new: int) -> torch.Tensor:
        """(B, new) positions of the next `new` tokens, counted from each row's first token."""
        columns = torch.arange(self.length, self.length + new, device=self.tokens.device)
        return (columns - self._starts).clamp(min=0)

    def attention_mask(self, new: int) -> torch.Tensor | None:
        """(B, length + new): True for real tokens, False for left padding; None when no row is padded."""
        if not any(self.starts):
            return None
        return self.visible(new)

    def visible(self, new: int = 0) -> torch.Tensor:
        """(B, length + new): True from each row's first token on."""
        return torch.arange(self.length + new, device=self.tokens.device) >= self._starts

    def full_rows(self) -> list[int]:
        """Rows whose window has no room for another token: the next one makes them jump forward."""
        return [row for row, start in enumerate(self.starts) if self.length - start == self.capacity]

    def next_windows(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        """The token ids each row continues from when its next token arrives: a full window jumps forward to
        its last three quarters (less that token), so the cache of those rows must be prefilled again
        (`replace`); every other row keeps its window."""
        kept = self.capacity - self.capacity // 4 - 1
        windows = []
        for row in range(self.batch_size) if rows is None else rows:
            start = self.starts[row]
            if self.length - start == self.capacity:
                start = self.length - kept
            windows.append(self.tokens[row, start : self.length].tolist())
        return windows

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order (the others leave the batch)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        self.keys, self.values = self.keys[:, index], self.values[:, index]
        self.tokens = self.tokens[index]
        self._set_starts([self.starts[row] for row in rows])
        self._compact()

    def join(self, other: KVCache) -> None:
        """Add other's rows after these (a batch that is running takes in newly prefilled rows).

        Whichever side has the shorter windows is padded on the left; `other` is used up.
        """
        if other.capacity != self.capacity or other.keys.shape[2:] != self.keys.shape[2:]:
            raise ValueError("join wants a cache made for the same model")
        length = max(self.length, other.length)
        self._align(length)
        other._align(length)
        self.keys = torch.cat([self.keys, other.keys], dim=1)
        self.values = torch.cat([self.values, other.values], dim=1)
        self.tokens = torch.cat([self.tokens, other.tokens])
        self._set_starts(self.starts + other.starts)

    def replace(self, rows: Sequence[int], other: KVCache) -> None:
        """Put other's rows in place of these (rows whose windows were prefilled again); `other` is used up."""
        length = max(self.length, other.length)
        self._align(length)
        other._align(length)
        index = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        self.keys[:, index], self.values[:, index] = other.keys, other.values
        self.tokens[index] = other.tokens
        starts = list(self.starts)
        for row, start in zip(rows, other.starts, strict=True):
            starts[row] = start
        self._set_starts(starts)
        self._compact()

    def _compact(self) -> None:
        """Drop the padding columns that no row needs, so the longest window starts at column 0."""
        self._align(self.length - min(self.starts, default=self.length))

    def _align(self, length: int) -> None:
        """Move every row so that the windows end at column `length` (what moves off the left is padding)."""
        shift = length - self.length
        if shift == 0:
            return
        source, target = slice(max(0, -shift), self.length), slice(max(0, shift), length)
        keys, values, tokens = (torch.zeros_like(t) for t in (self.keys, self.values, self.tokens))
        keys[:, :, :, target] = self.keys[:, :, :, source]
        values[:, :, :, target] = self.values[:, :, :, source]
        tokens[:, target] = self.tokens[:, source]
        self.keys, self.values, self.tokens, self.length = keys, values, tokens, length
        self._set_starts([start + shift for start in self.starts])

    def _set_starts(self, starts: list[int]) -> None:
        self.starts = starts
        self._starts = torch.tensor(starts, dtype=torch.long, device=self.tokens.device).view(-1, 1)


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine position codes (Vaswani et al.), looked up by absolute position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        position = torch.arange(config.max_seq_length).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, config.d_model, 2) * (-math.log(10000.0) / config.d_model))
        table = torch.zeros(config.max_seq_length, config.d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("table", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, with the mask drawn faster on CPU.

    PyTorch's CPU dropout draws one Bernoulli sample per element (about 6 ns each on our 2-core machine), which
    made dropout a tenth of a v2 training step. Here each element compares a 16-bit quarter of a random 64-bit
    integer with a threshold: the same seeded generator, keep probability 1 - p to within 2^-17, and the mask
    kept in x's dtype with the 1 / (1 - p) scale folded in, so backward is one multiply. About a third of the
    cost. Other devices keep PyTorch's fused kernel.
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


def attention_with_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_k)) v with dropout on the attention weights, for CPU training.

    What SDPA falls back to on CPU when dropout is on (its fused kernel has none), but with `dropout`'s faster
    mask: the attention weights are the largest tensor the trunk drops. mask None means causal.
    """
    T, S = q.size(2), k.size(2)
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # scaling q is T / d_k times cheaper
    allowed = mask if mask is not None else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    weights = scores.masked_fill_(~allowed, float("-inf")).softmax(dim=-1)
    return dropout(weights, p, True) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.d_k = config.n_heads, config.d_k
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_dropout = Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.d_k).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, dk)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, S, dk) with S = cached + T
        if self.training and self.dropout > 0 and x.device.type == "cpu":
            y = attention_with_dropout(q, k, v, mask, self.dropout)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                # No explicit mask means either a fresh prefill (square: causal) or one new token (sees all).
                is_causal=mask is None and T > 1,
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + ff(ln(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_ff = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), mask, cache, layer)
        return x + self.ff(self.ln_ff(x))


class TinyLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = SinusoidalPositions(config)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=not config.tie_weights)
        if config.tie_weights:
            self.head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self) -> None:
        """All initialisation in one place: GPT-2's N(0, 0.02), residual projections scaled by depth."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.proj, block.ff.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.config.n_layers))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model) for token ids (B, T).

        attention_mask (B, S) marks real tokens (1) versus left padding (0) over all S = cached + T keys, and
        positions (B, T) gives the tokens' positions; with a cache both default to the cache's own (its
        left-padded rows count from their first real token). segments (B, T) says which packed example each
        token belongs to: a token attends only to earlier tokens of its own segment, so packed examples never
        see each other.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_length:
            raise ValueError(f"{start + T} tokens exceed the context window of {self.config.max_seq_length}")
        if cache is not None:
            positions = cache.positions(T) if positions is None else positions
            attention_mask = cache.attention_mask(T) if attention_mask is None else attention_mask
        elif positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        x = self.embed(idx) * math.sqrt(self.config.d_model) + self.positions(positions)
        x = self.dropout(x)
        mask = self._attention_mask(B, T, start, attention_mask, segments, idx.device)
        for layer, block in enumerate(self.blocks):
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, cache, layer, use_reentrant=False)
            else:
                x = block(x, mask, cache, layer)
        if cache is not None:
            cache.advance(idx)
        return self.ln_f(x)

    @staticmethod
    def _attention_mask(
        B: int,
        T: int,
        start: int,
        attention_mask: torch.Tensor | None,
        segments: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """None where SDPA's own causal flag (or no mask at all, for one new token) is exact."""
        if segments is not None:
            if start or attention_mask is not None:
                raise ValueError("segments (packed rows) take no KV cache and no padding mask")
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            return (causal & (segments[:, :, None] == segments[:, None, :])).unsqueeze(1)  # (B, 1, T, T)
        if attention_mask is None and (start == 0 or T == 1):
            return None
        S = start + T
        query_pos = torch.arange(start, S, device=device).unsqueeze(1)
        key_pos = torch.arange(S, device=device).unsqueeze(0)
        allowed = (key_pos <= query_pos).expand(B, T, S)  # (B, T, S)
        if attention_mask is not None:
            # A padded query still sees itself, so no row is empty (an empty row would give NaN).
            allowed = allowed & (attention_mask[:, None, :S].bool() | (key_pos == query_pos))
        return allowed.unsqueeze(1)  # (B, 1, T, S)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.logits(
            self.hidden_states(
                idx, cache=cache, attention_mask=attention_mask, positions=positions, segments=segments
            )
        )


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
        # separate bias pass over the (chunk, V) logits costs a sixth of the output layer's forward here.
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
                # A (1, chunk) x (chunk, V) product sums the rows ~5x faster than probs.sum(0) here.
                grad_bias = _accumulate(grad_bias, (probs.new_ones(1, probs.size(0)) @ probs).squeeze(0))
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


def activation_bytes_per_row(config: ModelConfig, *, checkpointing: bool) -> int:
    """A generous estimate of the memory one max_seq_length row keeps for the backward pass, in float32.

    Per layer and token: about 8 d_model-wide tensors (norms, q/k/v, attention output, residuals), 2
    d_ff-wide (feed-forward up and its activation) and n_heads x T attention weights (the plain attention
    path keeps them); doubled for autocast copies and the allocator's slack. Checkpointing keeps each
    layer's input only, plus one layer recomputed at a time.
    """
    per_layer = 8 * config.d_model + 2 * config.d_ff + config.n_heads * config.max_seq_length
    layers = 1 + config.n_layers * config.d_model / per_layer if checkpointing else config.n_layers
    return int(2 * 4 * per_layer * layers * config.max_seq_length)


def model_summary(model: TinyLM) -> str:
    """A short table of the architecture and where the parameters are, printed when training starts."""
    c = model.config

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    block = count(model.blocks[0])
    head = "tied to the embedding" if c.tie_weights else f"{count(model.head):,}"
    rows = [
        ("token embedding", f"Embedding({c.vocab_size}, {c.d_model})", f"{count(model.embed):,}"),
        ("positions", f"sinusoidal({c.max_seq_length}, {c.d_model}), dropout {c.dropout}", "0"),
        (
            f"blocks x{c.n_layers}",
            f"LayerNorm, attention {c.n_heads} heads x {c.d_k}, "
            f"LayerNorm, ff {c.d_model}->{c.d_ff}->{c.d_model}",
            f"{block:,} each",
        ),
        ("final norm", f"LayerNorm({c.d_model})", f"{count(model.ln_f):,}"),
        ("output", f"Linear({c.d_model} -> {c.vocab_size})", head),
    ]
    width = max(len(r[1]) for r in rows)
    lines = [f"TinyLM: {model.num_parameters():,} parameters"]
    lines += [f"  {name:<16} {what:<{width}}  {params:>14}" for name, what, params in rows]
    return "\n".join(lines)
