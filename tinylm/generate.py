"""Generation in layers: pick the next token, generate token ids with a KV cache, stream text.

`Engine(model, tokenizer)` is the one way in. Text comes from a live `Batch`: requests (`Request`: a prompt
and its own sampling settings, stop strings, seed and log-probability wish) join it between decode steps and
leave it when they finish; the HTTP API drives one directly, and the terminal chat and the web page read
`Engine.stream` (one prompt), which runs a batch of one. `generate_batch` gives whole answers. Below those,
`prefill` and the per-token `step` keep each row's window in a `KVCache`, `next_token` picks each token, and
`generate_ids` repeats them for a fixed batch of token ids. Nothing here knows about HTTP, terminals or
training.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tinylm.config import SamplingConfig
from tinylm.model import KVCache, TinyLM
from tinylm.tokenizer import Tokenizer

# A temperature below this is greedy: dividing logits by a vanishing temperature would overflow to inf/NaN.
GREEDY_BELOW = 1e-5


def next_token(
    logits: torch.Tensor,
    sampling: SamplingConfig,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose one token per row from last-position logits (B, V).

    Order: repetition penalty, then temperature (below GREEDY_BELOW: greedy argmax), top-k, top-p, min-p, draw.
    `seen` (B, V) marks tokens already in each row's context, for the repetition penalty.
    """
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(
            logits > 0, logits / sampling.repetition_penalty, logits * sampling.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if sampling.temperature < GREEDY_BELOW:
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


@dataclass(frozen=True)
class TokenLogprob:
    """A generated (or prompt) token, its log-probability under the model, and the likeliest alternatives.

    Log-probabilities are the model's own (a log-softmax of its logits), before the repetition penalty,
    temperature or any filter, as OpenAI and vLLM report them.
    """

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass
class Chunk:
    """A piece of streamed text; the last chunk of a stream carries finish_reason and the counts.

    `logprobs` (when asked for) holds the tokens whose text this chunk completes.
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)

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


@dataclass(frozen=True)
class Request:
    """One answer to generate, with its own settings, so that any mix of requests can share one batch.

    A seeded request draws from its own generator, so its answer does not depend on the other rows.
    `logprobs` asks for each token's log-probability and that many likeliest alternatives.
    """

    prompt: Sequence[int]
    sampling: SamplingConfig
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None


class Row:
    """One request's place in a live `Batch`: its text so far, its token count and its own generator."""

    def __init__(self, request: Request, tokenizer: Tokenizer, device: torch.device):
        self.request = request
        self.tokenizer = tokenizer
        self.tracker = _TextTracker(tokenizer, request.stop)
        self.generator = None
        if request.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.seed)
        self.count = 0
        self.started = time.perf_counter()
        # Log-probabilities of tokens whose text is not shown yet, each with where its text ends.
        self._pending: list[tuple[TokenLogprob, int]] = []

    def push(self, token: int, logprob: TokenLogprob | None) -> Chunk | None:
        """Take this row's next token; the chunk to send, or None while its text is held back."""
        self.count += 1
        tracker = self.tracker
        text = tracker.push(token)
        if logprob is not None and token != self.tokenizer.eos_id:
            self._pending.append((logprob, len(tracker.text.rstrip("\ufffd"))))
        reason = tracker.finish_reason
        if reason is None and self.count >= self.request.sampling.max_new_tokens:
            text, reason = text + tracker.flush(), "length"
        # A token is reported, in order, with the chunk that shows the end of its text; those of a stop
        # string never are.
        ready = 0
        while ready < len(self._pending) and self._pending[ready][1] <= tracker.shown:
            ready += 1
        shown = [lp for lp, _ in self._pending[:ready]]
        self._pending = self._pending[ready:] if reason is None else []
        if reason is None:
            return Chunk(text, logprobs=shown) if text or shown else None
        return Chunk(
            text,
            finish_reason=reason,
            prompt_tokens=len(self.request.prompt),
            completion_tokens=self.count,
            seconds=time.perf_counter() - self.started,
            logprobs=shown,
        )


class Batch:
    """A live batch: requests join between decode steps (prefilled, then joined to the running cache) and
    leave when they finish or are removed, freeing their row at once.

    Each row picks its token with its own settings from its own logits, so a greedy row gets exactly the
    tokens it gets alone and a seeded row the same text whatever else is in the batch. Not thread-safe:
    one thread drives a batch.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.rows: list[Row] = []
        self._cache: KVCache | None = None
        self._logits: torch.Tensor | None = None  # (B, V): every row's next-token logits

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, requests: Sequence[Request]) -> list[Row]:
        """Prefill these requests in one pass and join them to the batch; their rows, in order."""
        if not requests:
            return []
        for request in requests:
            if request.sampling.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be at least 1, got {request.sampling.max_new_tokens}")
        cache, logits = self.engine.prefill([r.prompt for r in requests])
        if self._cache is None or self._logits is None:
            self._cache, self._logits = cache, logits
        else:
            self._cache.join(cache)
            self._logits = torch.cat([self._logits, logits])
        rows = [Row(r, self.engine.tokenizer, logits.device) for r in requests]
        self.rows += rows
        return rows

    @torch.inference_mode()
    def remove(self, rows: Sequence[Row]) -> None:
        """These rows leave the batch now (a client that went away); the others go on unchanged."""
        gone = set(map(id, rows))
        kept = [index for index, row in enumerate(self.rows) if id(row) not in gone]
        if len(kept) == len(self.rows):
            return
        self.rows = [self.rows[index] for index in kept]
        if not kept or self._cache is None or self._logits is None:
            self._cache, self._logits = None, None
            return
        self._cache.keep(kept)
        self._logits = self._logits[kept]

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, Chunk]]:
        """Every row takes its next token; the rows with text to show (or that finished) and their chunks.

        Finished rows leave before the forward pass that gives the others their next logits.
        """
        if self._cache is None or self._logits is None:
            return []
        logits, cache = self._logits, self._cache
        seen = None
        if any(row.request.sampling.repetition_penalty != 1.0 for row in self.rows):
            seen = _in_windows(cache, logits.size(-1))
        tokens = torch.stack(
            [
                next_token(
                    logits[index : index + 1],
                    row.request.sampling,
                    seen=None if seen is None else seen[index : index + 1],
                    generator=row.generator,
                )[0]
                for index, row in enumerate(self.rows)
            ]
        )
        chosen = tokens.tolist()
        logprobs = self._logprobs(logits, chosen)
        chunks: list[tuple[Row, Chunk]] = []
        for row, token, logprob in zip(self.rows, chosen, logprobs, strict=True):
            chunk = row.push(token, logprob)
            if chunk is not None:
                chunks.append((row, chunk))
        finished = [row for row, chunk in chunks if chunk.finish_reason is not None]
        if finished:
            staying = [index for index, row in enumerate(self.rows) if row not in finished]
            self.remove(finished)
            tokens = tokens[staying]
        if self.rows:
            self._logits = self.engine.step(cache, tokens)
        return chunks

    def _logprobs(self, logits: torch.Tensor, chosen: list[int]) -> list[TokenLogprob | None]:
        """The chosen tokens' log-probabilities for the rows that asked for them."""
        wanted = [index for index, row in enumerate(self.rows) if row.request.logprobs is not None]
        found: list[TokenLogprob | None] = [None] * len(self.rows)
        if not wanted:
            return found
        logprobs = torch.log_softmax(logits[wanted].float(), dim=-1)
        for place, index in enumerate(wanted):
            top = self.rows[index].request.logprobs or 0
            found[index] = _token_logprob(self.engine.tokenizer, logprobs[place], chosen[index], top)
        return found


def _token_logprob(tokenizer: Tokenizer, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry in one position's log-probabilities (V,), with the `top` likeliest alternatives."""
    alternatives: tuple[tuple[int, str, float], ...] = ()
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = tuple(
            (i, tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        )
    return TokenLogprob(token, tokenizer.decode([token]), float(logprobs[token]), alternatives)


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

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: Sequence[int], *, top: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first, which has
        no context), with `top` alternatives: what scoring a text through the API (`echo`) reports.

        The prompt must fit in the context window.
        """
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        window = self.model.config.max_seq_length
        if len(prompt) > window:
            raise ValueError(f"a prompt of {len(prompt)} tokens exceeds the context window of {window}")
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.model.head.weight.device)
        logprobs = torch.log_softmax(self.model(ids)[0, :-1].float(), dim=-1)  # (T - 1, V)
        found: list[TokenLogprob | None] = [None]
        for position, token in enumerate(prompt[1:]):
            found.append(_token_logprob(self.tokenizer, logprobs[position], token, top))
        return found

    def stream_batch(self, requests: Sequence[Request]) -> Iterator[tuple[int, Chunk]]:
        """Stream several requests from one live batch: (request index, chunk) pairs as text comes.

        Each request stops on its own end-of-text, stop strings or token limit; its last chunk carries its
        finish_reason and counts. Iteration ends when every request has finished.
        """
        batch = Batch(self)
        index = {id(row): i for i, row in enumerate(batch.add(requests))}
        while batch:
            for row, chunk in batch.step():
                yield index[id(row)], chunk

    def stream(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig,
        *,
        stop: Sequence[str] = (),
        seed: int | None = None,
        logprobs: int | None = None,
    ) -> Iterator[Chunk]:
        """Stream the answer to one prompt as text chunks, ending with a chunk that has finish_reason.

        finish_reason is "stop" (end-of-text or a stop string) or "length" (max_new_tokens reached).
        """
        request = Request(prompt_ids, sampling, stop, seed, logprobs)
        for _, chunk in self.stream_batch([request]):
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
        return self.generate_batch([prompt_ids], sampling, stop=stop, seed=seed)[0]

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[Completion]:
        """Answer several prompts in one batch; each row stops on its own end-of-text, stop or length, and
        a seed gives each row what that seed gives it alone."""
        texts: list[list[str]] = [[] for _ in prompts]
        last: list[Chunk] = [Chunk("") for _ in prompts]
        for row, chunk in self.stream_batch([Request(p, sampling, stop, seed) for p in prompts]):
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
