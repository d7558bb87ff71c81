"""The decoder-only transformer, read top-down: cache, positions, attention, feed-forward, block, model.

The model is pure: token ids in, logits out. No device choice, printing or I/O lives here: the CPU fast
paths it calls are in `kernels`, the training loss (which skips positions whose loss does not count) in
`loss`. Decoding passes an explicit `KVCache`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinylm.config import ModelConfig
from tinylm.kernels import Dropout, attention

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
        shape = (config.n_layers, batch_size, config.kv_heads, config.max_seq_length, config.d_k)
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


@dataclass(frozen=True)
class Design:
    """What an architecture (`model.arch`) builds: the one place where its options switch."""

    positions: str  # "sinusoidal" (a fixed table) or "learned" (a trained one), added to the embeddings;
    # "rotary": each head's queries and keys turned by a position-dependent angle
    norm: str  # "layer" (LayerNorm) or "rms" (RMSNorm)
    mlp: str  # "gelu" (exact erf), "gelu_tanh" (the tanh approximation) or "swiglu" (silu(gate) * up)
    bias: bool  # do the blocks' linear layers have biases
    output_bias: bool  # does an output layer that is not tied to the embedding have one
    scale_embeddings: bool  # token embeddings times sqrt(d_model) before the positions are added


DESIGNS: dict[str, Design] = {
    # The seed's design (Vaswani et al. positions, pre-norm blocks), unchanged.
    "tinylm": Design("sinusoidal", "layer", "gelu", bias=True, output_bias=True, scale_embeddings=True),
    # Hugging Face's GPT2LMHeadModel.
    "gpt2": Design("learned", "layer", "gelu_tanh", bias=True, output_bias=False, scale_embeddings=False),
    # Hugging Face's LlamaForCausalLM.
    "llama": Design("rotary", "rms", "swiglu", bias=False, output_bias=False, scale_embeddings=False),
}


def design(config: ModelConfig) -> Design:
    return DESIGNS[config.arch]


def make_norm(config: ModelConfig) -> nn.Module:
    if design(config).norm == "rms":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine position codes (Vaswani et al.), looked up by absolute position."""

    table: torch.Tensor

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


class RotaryPositions(nn.Module):
    """Rotary position codes (Su et al.) as Llama lays them out: the two halves of each head's width are
    the (x, y) of d_k / 2 pairs, each turned by its own frequency times the position."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        d_k = config.d_k
        inverse_frequency = 1.0 / (config.rope_theta ** (torch.arange(0, d_k, 2).float() / d_k))
        angles = torch.outer(torch.arange(config.max_seq_length).float(), inverse_frequency)  # (T, dk / 2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, dk)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, T, dk) for positions (B, T), broadcasting over the heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Queries or keys (B, nh, T, dk) turned by their positions' angles."""
    cos, sin = (t.to(x.dtype) for t in rotary)
    half = x.size(-1) // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def make_positions(config: ModelConfig) -> nn.Module:
    kind = design(config).positions
    if kind == "learned":
        return nn.Embedding(config.max_seq_length, config.d_model)
    return RotaryPositions(config) if kind == "rotary" else SinusoidalPositions(config)


Rotary = tuple[torch.Tensor, torch.Tensor] | None


class QKNorm(nn.Module):
    """RMS norm of queries and keys (B, nh, T, dk) over each head's width, with a learned gain per dimension
    (one for the queries, one for the keys, shared by the heads). The statistics are taken in float32 and
    each keeps its dtype, so that under autocast queries, keys and values still share one."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.q = nn.RMSNorm(config.d_k, eps=config.norm_eps)
        self.k = nn.RMSNorm(config.d_k, eps=config.norm_eps)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q(q.float()).to(q.dtype), self.k(k.float()).to(k.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head attention; with fewer key/value heads than query heads (grouped-query attention) each
    key/value head serves n_heads / n_kv_heads query heads, and the cache holds only the fewer. With
    qk_norm, queries and keys are normalised per head before the positions turn them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = design(config).bias
        self.n_heads, self.n_kv_heads, self.d_k = config.n_heads, config.kv_heads, config.d_k
        self.widths = [config.n_heads * config.d_k, *[config.kv_heads * config.d_k] * 2]
        self.qkv = nn.Linear(config.d_model, sum(self.widths), bias=bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=bias)
        self.qk_norm = QKNorm(config) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int, rotary: Rotary
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.widths, dim=2)
        q = q.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, nh, T, dk)
        k, v = (t.view(B, T, self.n_kv_heads, self.d_k).transpose(1, 2) for t in (k, v))  # (B, nkv, T, dk)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        if rotary is not None:
            q, k = rotate(q, rotary), rotate(k, rotary)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nkv, S, dk) with S = cached + T
        if self.n_kv_heads != self.n_heads:
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, S, dk)
        y = attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, dk)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """down(act(up(x))); SwiGLU's `up` holds the gate's rows and then the up rows: down(silu(gate) * up)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind, bias = design(config).mlp, design(config).bias
        width = 2 * config.d_ff if self.kind == "swiglu" else config.d_ff
        self.up = nn.Linear(config.d_model, width, bias=bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_attn = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_ff = make_norm(config)
        self.ff = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        rotary: Rotary = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), mask, cache, layer, rotary)
        return x + self.ff(self.ln_ff(x))


class TinyLM(nn.Module):
    """The decoder of every architecture in DESIGNS: embeddings, blocks, final norm, output layer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.design = design(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = make_positions(config)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = make_norm(config)
        output_bias = self.design.output_bias and not config.tie_weights
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=output_bias)
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
        # The projections that write into the residual stream, scaled so its variance stays put with depth.
        for module in self.modules():
            if isinstance(module, CausalSelfAttention | FeedForward):
                residual = module.proj if isinstance(module, CausalSelfAttention) else module.down
                nn.init.normal_(residual.weight, std=0.02 / math.sqrt(2 * self.config.n_layers))

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
        x = self.embed(idx)
        if self.design.scale_embeddings:
            x = x * math.sqrt(self.config.d_model)
        rotary = None
        if self.design.positions == "rotary":
            rotary = self.positions(positions)
        else:
            x = x + self.positions(positions)
        x = self.dropout(x)
        mask = self._attention_mask(B, T, start, attention_mask, segments, idx.device)
        for layer, block in enumerate(self.blocks):
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, cache, layer, rotary, use_reentrant=False)
            else:
                x = block(x, mask, cache, layer, rotary)
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


def parameter_count(config: ModelConfig) -> int:
    """The parameters of TinyLM(config), from its shapes alone: what a run needs is known before it builds
    anything (tests check it against the built model)."""
    d, ff, V, kinds = config.d_model, config.d_ff, config.vocab_size, design(config)
    norm = 2 * d if kinds.norm == "layer" else d
    qkv = d + 2 * config.kv_heads * config.d_k
    linears = [(d, qkv), (d, d), (d, 2 * ff if kinds.mlp == "swiglu" else ff), (ff, d)]
    qk_norm = 2 * config.d_k if config.qk_norm else 0
    block = 2 * norm + qk_norm + sum(i * o + (o if kinds.bias else 0) for i, o in linears)
    positions = config.max_seq_length * d if kinds.positions == "learned" else 0
    head = 0 if config.tie_weights else V * d + (V if kinds.output_bias else 0)
    return V * d + positions + config.n_layers * block + norm + head
