"""Generation in layers: pick the next token, generate token ids with a KV cache, stream text.

`Engine(model, tokenizer)` is the one way in: the terminal chat, the web page and the HTTP API all read its
`stream` (one prompt), `stream_batch` (several prompts in one batched pass, streamed row by row) or
`generate_batch` (their whole answers). Below those, `generate_ids` repeats `next_token` over the engine's
`prefill` and per-token `step`, which keep each row's window in a `KVCache`. Nothing here knows about HTTP,
terminals or training.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from tinylm.config import SamplingConfig
from tinylm.model import KVCache, TinyLM
from tinylm.tokenizer import Tokenizer


def next_token(
    logits: torch.Tensor,
    sampling: SamplingConfig,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose one token per row from last-position logits (B, V).

    Order: repetition penalty, then temperature (0 means greedy argmax), top-k, top-p, min-p, draw.
    `seen` (B, V) marks tokens already in each row's context, for the repetition penalty.
    """
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(
            logits > 0, logits / sampling.repetition_penalty, logits * sampling.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    # Candidates sorted from most to least likely: the top k only when top-k is on, so that top-p sorts k
    # values rather than the whole vocabulary.
    candidates = None
    if 0 < sampling.top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, sampling.top_k, dim=-1)
    elif sampling.top_p < 1.0:
        logits, candidates = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        # Drop a token when the tokens before it already cover top_p; the most likely token always stays.
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= sampling.top_p, 0.0)
    if sampling.min_p > 0:
        probs = probs.masked_fill(probs < sampling.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    return (choice if candidates is None else candidates.gather(1, choice)).squeeze(-1)


class _TextTracker:
    """Turns one row's token ids into text that is safe to show so far.

    Text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or in what could
    be the start of a stop string, so neither a broken character nor part of a stop string is ever shown.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        if token == self.tokenizer.eos_id:
            self.finish_reason = "stop"
            return self._show(len(self.text))
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.finish_reason = "stop"
            self.text = self.text[: min(hits)]
            return self._show(len(self.text))
        end = len(self.text.rstrip("\ufffd"))
        hold = max(
            (n for s in self.stop for n in range(1, len(s)) if self.text[:end].endswith(s[:n])), default=0
        )
        return self._show(max(end - hold, self.shown))

    def flush(self) -> str:
        """Everything not yet shown, at the end of generation (a stop-string prefix is then just text)."""
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        chunk = self.text[self.shown : end]
        self.shown = max(self.shown, end)
        return chunk


@dataclass
class Chunk:
    """A piece of streamed text; the last chunk of a stream carries finish_reason and the counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_sec(self) -> float:
        """Decoding speed: completion tokens per second since generation began (the prompt's pass included)."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """Generates with one model and its tokenizer, and owns the fast layouts that decoding uses.

    The layouts are made from the weights when the engine is made. After the weights change in place (an
    optimizer step, `load_state_dict`) or the model moves to another device, call `refresh()`, or the
    engine decodes with the old ones. Threads may share an engine: each generation keeps its state in its
    own `KVCache`.
    """

    def __init__(self, model: TinyLM, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.refresh()

    def refresh(self) -> None:
        """Remake the decoding layout of the output layer from the model's current weights.

        The 50,257-wide output layer is most of the decoding time of a model this small. On CPU, BLAS
        multiplies one row by the transpose of nn.Linear's (V, d_model) weight much slower than by a
        contiguous (d_model, V) copy, and several rows faster as (W @ h^T)^T than as h @ W^T (see
        docs/benchmarks.md): so one row uses a copy made here, several rows the weight itself. Other devices
        use the layer as it is.
        """
        weight = self.model.head.weight
        self._transposed = weight.detach().t().contiguous() if weight.device.type == "cpu" else None

    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Generator[torch.Tensor, None, None]:
        """Yield the next token of every row (B,), `sampling.max_new_tokens` times; the caller may stop sooner.

        A greedy row gets exactly the tokens it would get alone (sampled rows draw from one generator, which
        `seed` makes reproducible for the batch as a whole). Each row sees its own window of at most
        max_seq_length tokens, moved as `KVCache` says. Without the cache (`use_cache=False`, a reference for
        tests) every step runs every row's whole window again; the windows move identically.
        """
        cache, logits = self.prefill(prompts)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed(seed)
        for remaining in range(sampling.max_new_tokens - 1, -1, -1):
            seen = _in_windows(cache, logits.size(-1)) if sampling.repetition_penalty != 1.0 else None
            token = next_token(logits, sampling, seen=seen, generator=generator)
            yield token
            if not remaining:
                return
            if use_cache:
                logits = self.step(cache, token)
            else:
                windows = cache.next_windows()
                cache, logits = self.prefill([[*w, t] for w, t in zip(windows, token.tolist(), strict=True)])

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[KVCache, torch.Tensor]:
        """A new cache holding the prompts' windows, and every row's next-token logits (B, V).

        Rows join a running batch this way: prefill them, then `KVCache.join` and concatenate the logits.
        """
        cache, hidden = self._fill(prompts)
        return cache, self._output_layer(hidden)

    @torch.inference_mode()
    def step(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) into the cache and return the next-token logits (B, V).

        Rows whose window is full first jump forward as the cache says, and their windows are prefilled again.
        """
        full = cache.full_rows()
        if full:
            cache.replace(full, self._fill(cache.next_windows(full))[0])
        hidden = self.model.hidden_states(tokens[:, None], cache=cache)
        return self._output_layer(hidden[:, -1])

    def _fill(self, prompts: Sequence[Sequence[int]]) -> tuple[KVCache, torch.Tensor]:
        """A new cache holding the prompts' windows, and every row's last hidden state (B, d_model)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        weight = self.model.head.weight
        cache = KVCache(self.model.config, len(prompts), device=weight.device, dtype=weight.dtype)
        hidden = self.model.hidden_states(cache.prefill_ids(prompts), cache=cache)
        return cache, hidden[:, -1]  # only the last position's logits are needed

    def _output_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, d_model) -> (B, V) in the layout `refresh` chose for B rows."""
        weight, bias = self.model.head.weight, self.model.head.bias
        if self._transposed is None:
            return self.model.logits(hidden)
        if hidden.size(0) == 1:
            return hidden @ self._transposed if bias is None else torch.addmm(bias, hidden, self._transposed)
        if bias is None:
            return (weight @ hidden.t()).t()
        return torch.addmm(bias[:, None], weight, hidden.t()).t()

    def stream_batch(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        stops: Sequence[Sequence[str]] | None = None,
        max_new_tokens: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> Generator[list[Chunk | None], None, None]:
        """Stream several prompts from one batched pass: each step yields one chunk per row.

        A row's chunk is None once that row has finished; its last chunk carries finish_reason and the counts.
        Each row stops on its own end-of-text, its own stop strings (`stops[row]`) or its own token limit
        (`max_new_tokens[row]`, default sampling.max_new_tokens), so requests with different options can
        share the forward passes. Iteration ends when every row has finished.
        """
        started = time.perf_counter()
        trackers = [_TextTracker(self.tokenizer, row_stop) for row_stop in (stops or [()] * len(prompts))]
        limits = list(max_new_tokens or [sampling.max_new_tokens] * len(prompts))
        if not len(trackers) == len(limits) == len(prompts):
            raise ValueError("stops and max_new_tokens need one entry per prompt")
        if any(limit < 1 for limit in limits):
            raise ValueError(f"max_new_tokens must be at least 1 for every row, got {limits}")
        counts = [0] * len(prompts)
        finished = [False] * len(prompts)
        longest = replace(sampling, max_new_tokens=max(limits, default=1))
        tokens = self.generate_ids(prompts, longest, seed=seed)
        try:
            for row_tokens in tokens:
                chunks: list[Chunk | None] = []
                for row, token in enumerate(row_tokens.tolist()):
                    if finished[row]:
                        chunks.append(None)
                        continue
                    tracker = trackers[row]
                    counts[row] += 1
                    text = tracker.push(token)
                    reason = tracker.finish_reason
                    if reason is None and counts[row] >= limits[row]:
                        text, reason = text + tracker.flush(), "length"
                    if reason is None:
                        chunks.append(Chunk(text))
                        continue
                    finished[row] = True
                    chunks.append(
                        Chunk(
                            text,
                            finish_reason=reason,
                            prompt_tokens=len(prompts[row]),
                            completion_tokens=counts[row],
                            seconds=time.perf_counter() - started,
                        )
                    )
                yield chunks
                if all(finished):
                    return
        finally:
            tokens.close()

    def stream(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig,
        *,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> Iterator[Chunk]:
        """Stream the answer to one prompt as text chunks, ending with a chunk that has finish_reason.

        finish_reason is "stop" (end-of-text or a stop string) or "length" (max_new_tokens reached).
        """
        for (chunk,) in self.stream_batch([prompt_ids], sampling, stops=[stop], seed=seed):
            if chunk is not None and (chunk.text or chunk.finish_reason):
                yield chunk

    def complete(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig,
        *,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> Completion:
        """The whole answer to one prompt at once (a drained `stream`)."""
        chunks = list(self.stream(prompt_ids, sampling, stop=stop, seed=seed))
        last = chunks[-1]
        return Completion(
            "".join(c.text for c in chunks),
            last.finish_reason or "length",
            last.prompt_tokens,
            last.completion_tokens,
        )

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[Completion]:
        """Answer several prompts in one batched pass; each row stops on its own end-of-text, stop or length."""
        texts: list[list[str]] = [[] for _ in prompts]
        last: list[Chunk] = [Chunk("") for _ in prompts]
        for chunks in self.stream_batch(prompts, sampling, stops=[stop] * len(prompts), seed=seed):
            for row, chunk in enumerate(chunks):
                if chunk is not None:
                    texts[row].append(chunk.text)
                    last[row] = chunk
        return [
            Completion("".join(text), end.finish_reason or "length", end.prompt_tokens, end.completion_tokens)
            for text, end in zip(texts, last, strict=True)
        ]


def _in_windows(cache: KVCache, vocab_size: int) -> torch.Tensor:
    """(B, V): which tokens are in each row's window, for the repetition penalty."""
    counts = torch.zeros(cache.batch_size, vocab_size, dtype=torch.int32, device=cache.tokens.device)
    return counts.scatter_add_(1, cache.tokens[:, : cache.length], cache.visible().int()) > 0
