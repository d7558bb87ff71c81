"""Generation in three layers: pick the next token, generate token ids with a KV cache, stream text.

The terminal chat, the web page and the HTTP API all read the same `stream` (one prompt), `stream_batch`
(several prompts in one batched pass, streamed row by row) or `generate_batch` (its whole answers).
Nothing here knows about HTTP, terminals or training.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
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


# Per model: (the head weight's identity and version, its transpose). A dropped model frees its copy.
_TRANSPOSED_HEADS: weakref.WeakKeyDictionary[TinyLM, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def _output_layer(model: TinyLM, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The 50,257-wide output layer, (B, d_model) -> (B, V), in the fastest form measured for `batch` rows.

    It is most of the decoding time of a model this small. On CPU, BLAS multiplies one row by the
    transpose of nn.Linear's (V, d_model) weight several times slower than by a (d_model, V) copy, and
    several rows faster as (W @ x^T)^T than as x @ W^T (see docs/benchmarks.md). The copy is made once per
    weight version: optimizer steps and `load_state_dict` bump the version counter, so a stale copy is
    never used (a change made through `.data` would bypass it). Other devices use the layer as it is.
    """
    weight, bias = model.head.weight, model.head.bias
    if weight.device.type != "cpu":
        return model.logits
    if batch > 1:
        if bias is None:
            return lambda hidden: (weight @ hidden.t()).t()
        return lambda hidden: torch.addmm(bias[:, None], weight, hidden.t()).t()
    try:
        key = (weight.data_ptr(), weight._version, weight.dtype)
    except RuntimeError:  # weights made under inference_mode keep no version counter: never cache them
        key = None
    cached = _TRANSPOSED_HEADS.get(model)
    if key is None or cached is None or cached[0] != key:
        cached = (key, weight.detach().t().contiguous())
        if key is not None:
            _TRANSPOSED_HEADS[model] = cached
    transposed = cached[1]
    if bias is None:
        return lambda hidden: hidden @ transposed
    return lambda hidden: torch.addmm(bias, hidden, transposed)


@torch.inference_mode()
def generate_ids(
    model: TinyLM,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    pad_id: int = 0,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,), `sampling.max_new_tokens` times; the caller may stop sooner.

    Prompts of different lengths are left-padded with an attention mask and positions count from each
    row's first visible token, so a greedy row gets exactly the tokens it would get alone (sampled rows
    draw from one generator, which `seed` makes reproducible for the batch as a whole). Each row sees a
    window of at most max_seq_length tokens (a longer prompt keeps its end); when a row's window is full it
    jumps forward to its last three quarters and the cache is rebuilt, while the other rows keep their
    windows. The uncached path, a reference for tests, moves its windows identically.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    capacity = model.config.max_seq_length
    keep = capacity - capacity // 4
    batch, longest, steps = len(prompts), max(map(len, prompts)), sampling.max_new_tokens
    # All tokens in one preallocated matrix, rows right-aligned, so every step fills one more column.
    tokens = torch.full((batch, longest + steps), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) : longest] = torch.tensor(prompt, dtype=torch.long)
    columns = torch.arange(longest + steps, device=device)
    # first[row]: the column of the row's first visible token, i.e. where its window starts.
    first = [longest - len(p) + max(0, len(p) - capacity) for p in prompts]
    output_layer = _output_layer(model, batch)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache: KVCache | None = None
    seen: torch.Tensor | None = None
    for end in range(longest, longest + steps):  # columns [0, end) hold the tokens so far
        full = [row for row in range(batch) if end - first[row] > capacity]
        for row in full:
            first[row] = end - keep
        if full or cache is None or not use_cache:
            lo = min(first)
            starts = torch.tensor(first, device=device)[:, None]
            visible = columns[None, lo:] >= starts  # (B, columns from lo on)
            padded = lo != max(first)
            window = tokens[:, lo:end]
            if use_cache:
                cache = KVCache(model.config, batch, device=device, dtype=next(model.parameters()).dtype)
            hidden = model.hidden_states(
                window,
                cache=cache,
                attention_mask=visible[:, : end - lo] if padded else None,
                positions=(columns[None, lo:end] - starts).clamp(min=0),
            )
            if sampling.repetition_penalty != 1.0:
                counts = torch.zeros(batch, model.config.vocab_size, dtype=torch.int32, device=device)
                seen = counts.scatter_add_(1, window, visible[:, : end - lo].int()) > 0
        else:
            hidden = model.hidden_states(
                tokens[:, end - 1 : end],
                cache=cache,
                attention_mask=visible[:, : end - lo] if padded else None,
                positions=end - 1 - starts,
            )
            if seen is not None:
                seen.scatter_(1, tokens[:, end - 1 : end], True)
        last = hidden[:, -1]  # (B, d_model): only the last position's logits are needed
        logits = output_layer(last)  # (B, V)
        token = next_token(logits, sampling, seen=seen, generator=generator)
        tokens[:, end] = token
        yield token


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


def stream_batch(
    model: TinyLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    stops: Sequence[Sequence[str]] | None = None,
    max_new_tokens: Sequence[int] | None = None,
    seed: int | None = None,
) -> Iterator[list[Chunk | None]]:
    """Stream several prompts from one batched pass: each step yields one chunk per row.

    A row's chunk is None once that row has finished; its last chunk carries finish_reason and the counts.
    Each row stops on its own end-of-text, its own stop strings (`stops[row]`) or its own token limit
    (`max_new_tokens[row]`, default sampling.max_new_tokens), so requests with different options can
    share the forward passes. Iteration ends when every row has finished.
    """
    started = time.perf_counter()
    trackers = [_TextTracker(tokenizer, row_stop) for row_stop in (stops or [()] * len(prompts))]
    limits = list(max_new_tokens or [sampling.max_new_tokens] * len(prompts))
    if not len(trackers) == len(limits) == len(prompts):
        raise ValueError("stops and max_new_tokens need one entry per prompt")
    if any(limit < 1 for limit in limits):
        raise ValueError(f"max_new_tokens must be at least 1 for every row, got {limits}")
    counts = [0] * len(prompts)
    finished = [False] * len(prompts)
    longest = replace(sampling, max_new_tokens=max(limits, default=1))
    tokens = generate_ids(model, prompts, longest, pad_id=tokenizer.eos_id, seed=seed)
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
    model: TinyLM,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    sampling: SamplingConfig,
    *,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> Iterator[Chunk]:
    """Stream the answer to one prompt as text chunks, ending with a chunk that has finish_reason.

    finish_reason is "stop" (end-of-text or a stop string) or "length" (max_new_tokens reached).
    """
    for (chunk,) in stream_batch(model, tokenizer, [prompt_ids], sampling, stops=[stop], seed=seed):
        if chunk is not None and (chunk.text or chunk.finish_reason):
            yield chunk


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def complete(
    model: TinyLM,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    sampling: SamplingConfig,
    *,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> Completion:
    """The whole answer to one prompt at once (a drained `stream`)."""
    chunks = list(stream(model, tokenizer, prompt_ids, sampling, stop=stop, seed=seed))
    last = chunks[-1]
    return Completion(
        "".join(c.text for c in chunks),
        last.finish_reason or "length",
        last.prompt_tokens,
        last.completion_tokens,
    )


def generate_batch(
    model: TinyLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> list[Completion]:
    """Answer several prompts in one batched pass; each row stops on its own end-of-text, stop or length."""
    texts: list[list[str]] = [[] for _ in prompts]
    last: list[Chunk] = [Chunk("") for _ in prompts]
    for chunks in stream_batch(model, tokenizer, prompts, sampling, stops=[stop] * len(prompts), seed=seed):
        for row, chunk in enumerate(chunks):
            if chunk is not None:
                texts[row].append(chunk.text)
                last[row] = chunk
    return [
        Completion("".join(text), end.finish_reason or "length", end.prompt_tokens, end.completion_tokens)
        for text, end in zip(texts, last, strict=True)
    ]


class Engine:  # TEMPORARY shim until the engine branch lands (not committed)
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def refresh(self):
        torch.autograd.graph.increment_version(list(self.model.parameters()))

    def complete(self, ids, sampling, *, stop=(), seed=None):
        return complete(self.model, self.tokenizer, ids, sampling, stop=stop, seed=seed)
