"""The decoder-only transformer, read top-down: cache, positions, attention, feed-forward, block, model.

The model is pure: token ids in, logits out. No device choice, printing or I/O lives here: the CPU fast
paths it calls are in `kernels`, the training loss (which skips positions whose loss does not count) in
`loss`. Decoding passes an explicit `KVCache`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinylm.config import ModelConfig
from tinylm.kernels import Dropout, attention

IGNORE_INDEX = -100


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to the context window."""

    def __init__(
        self, config: ModelConfig, batch_size: int, *, device: torch.device | str, dtype: torch.dtype
    ):
        shape = (config.n_layers, batch_size, config.n_heads, config.max_seq_length, config.d_k)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = config.max_seq_length
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values (B, nh, T, dk) and return all of them so far."""
        end = self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} tokens exceed the context window of {self.capacity}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


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
        y = attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, dk)
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

        attention_mask (B, S) marks real tokens (1) versus left padding (0) over all S = cached + T keys;
        positions (B, T) overrides the default cache.length + arange(T), so padded rows count from their
        first real token. segments (B, T) says which packed example each token belongs to: a token attends
        only to earlier tokens of its own segment, so packed examples never see each other.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_length:
            raise ValueError(f"{start + T} tokens exceed the context window of {self.config.max_seq_length}")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        x = self.embed(idx) * math.sqrt(self.config.d_model) + self.positions(positions)
        x = self.dropout(x)
        mask = self._attention_mask(B, T, start, attention_mask, segments, idx.device)
        for layer, block in enumerate(self.blocks):
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, cache, layer, use_reentrant=False)
            else:
                x = block(x, mask, cache, layer)
        if cache is not None:
            cache.length += T
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
    d, ff, V = config.d_model, config.d_ff, config.vocab_size
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
    head = 0 if config.tie_weights else V * d + V
    return V * d + config.n_layers * block + 2 * d + head
