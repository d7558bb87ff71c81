"""An OpenAI-compatible HTTP API: a thin FastAPI layer over the engine's live `Batch`.

Any client of OpenAI's API (the `openai` libraries, chat front ends, editors, lm-evaluation-harness) can
talk to a tinylm model: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streamed as
server-sent events when `stream` is true), llama.cpp's `POST /tokenize` and `POST /detokenize` (with
vLLM's `GET /tokenizer_info`, which lm-evaluation-harness reads), and `GET /health`.

How OpenAI's notions map onto a tinylm model:

- Model id: the name of the run folder for a run folder or its `best_model.pt` / `latest.pt`, else the
  checkpoint file's stem (`runs/demo` and `runs/demo/best_model.pt` are both "demo";
  `runs/demo/checkpoint_step_500.pt` is "checkpoint_step_500"). Its entry states the context window.
- Chat: messages are rendered through the prompt template the model was trained on. Earlier user/assistant
  pairs become earlier turns; consecutive messages of one role are joined by a blank line. The template has
  no slot for a system prompt but one for a context passage (Dolly's `context`), so system (and developer)
  messages become the context passage of the last user message: put a passage to answer from there. The
  end of a turn ("### Instruction:") is always a stop string.
- Completions: the prompt is raw text (or token ids), continued as is (no template); an empty prompt starts
  after end-of-text, where every training record starts. `echo` returns the prompt before the answer, and
  with `logprobs` its tokens' log-probabilities (`max_tokens: 0` scores a text without generating).
- Limits: the prompt plus max_tokens must fit the context window. Nothing is trimmed or dropped silently:
  a prompt that leaves no room, or a max_tokens that does not fit, is a 400 error naming the numbers.
  Without max_tokens, an answer gets the checkpoint's max_new_tokens or what fits, whichever is less.
- Sampling: temperature, top_p and seed as OpenAI defines them; the checkpoint's sampling config fills in
  what a request leaves out, and top_k, min_p and repetition_penalty may be sent as extra fields. Choice i
  of a seeded request with n > 1 uses seed + i.
- Log-probabilities are the model's own (before penalties, temperature and filters), in OpenAI's shapes.
- Options this server cannot honour (tools, response_format, logit_bias, ...) are a 400 naming the field.

Generation runs on one worker thread per model, never on the event loop, in one live batch (continuous
batching): a new request is prefilled and joins between decode steps, a finished one (or one whose client
went away) leaves at once, and every row samples with its own settings, so any mix of requests shares the
forward passes. Each row gets the same tokens as it would alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from tinylm.checkpoint import BEST, LATEST, LoadedModel
from tinylm.config import MAX_TEMPERATURE, REPETITION_PENALTY_RANGE
from tinylm.generate import Batch, Chunk, Engine, Row, TokenLogprob
from tinylm.generate import Request as GenerationRequest
from tinylm.prompts import TEMPLATE, ConversationError, TextTokenizer, conversation_turns

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
# Rows one request may ask for (prompts x n); the live batch holds up to max_batch_size rows of any requests.
MAX_ROWS_PER_REQUEST = 16
# Alternatives per token that logprobs / top_logprobs may ask for (OpenAI's chat limit).
MAX_TOP_LOGPROBS = 20
# OpenAI options whose meaning this server cannot honour; sending one (with a non-empty value) is a 400
# rather than an answer that silently ignores it. Other unknown fields are ignored, as OpenAI's clients
# send extras (user, metadata, ...).
UNSUPPORTED_OPTIONS = ("suffix", "frequency_penalty", "presence_penalty")
# Options refused whenever they are sent at all (even false or empty): each changes what a client expects
# back (tool calls, JSON, biased tokens), so an answer without them would mislead.
REFUSED_OPTIONS = (
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "logit_bias",
)


class ServeError(RuntimeError):
    """The server cannot start (e.g. the port is taken); the message names the address."""


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- requests ---------------------------------------------------------------------------------------


# Held-back text is checked against every prefix of every stop string at each token: keep them short.
_StopString = Annotated[str, Field(max_length=256)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Request(BaseModel):
    """Fields both endpoints share; unknown fields are kept in `model_extra` to check the refused options."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=min(2.0, MAX_TEMPERATURE))
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(
        None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    n: int | None = Field(None, ge=1, le=MAX_ROWS_PER_REQUEST)
    stop: _StopString | Annotated[list[_StopString], Field(max_length=4)] | None = None
    # The range torch.Generator.manual_seed accepts.
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per token to report, or None when log-probabilities are not wanted."""
        return None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    # A string, or a list of content parts of which only text parts can be read by a text-only model.
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for index, part in enumerate(value):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise ValueError(f"part {index} is not a text part; this model reads only text")
        return "\n".join(part["text"] for part in value)


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # The newer name of max_tokens in OpenAI's chat API.
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_ROWS_PER_REQUEST)]
        | _TokenIds
        | Annotated[list[_TokenIds], Field(min_length=1, max_length=MAX_ROWS_PER_REQUEST)]
    )
    # 0 scores the prompt without generating (with echo).
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False

    def top_logprobs_wanted(self) -> int | None:
        if self.max_tokens == 0 and not self.echo:
            raise APIError(
                400, "max_tokens: 0 is allowed only with echo (to score the prompt)", param="max_tokens"
            )
        return self.logprobs


class TokenizeRequest(BaseModel):
    """llama.cpp's /tokenize body; `prompt` is vLLM's name for `content`."""

    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


_R = TypeVar("_R", bound=BaseModel)
_T = TypeVar("_T")


def _describe(error: ValidationError) -> APIError:
    """The first problem in one line, naming the field as OpenAI's `param` does (e.g. messages[0].role)."""
    errors = error.errors(include_url=False)
    # Of a union's per-member errors, a type mismatch says least ("should be a string" for a list).
    first = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    if first["type"] == "json_invalid":
        return APIError(
            400, f"The request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
        )
    # Union members appear in the location as type names ("str", "list[str]", "constrained-str"), which
    # say nothing to a user; field names never look like those.
    path = [p for p in first["loc"] if not (isinstance(p, str) and re.fullmatch(r"str|int|.*[\[-].*", p))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or None
    message = first["msg"].removeprefix("Value error, ")
    if param is None:
        return APIError(400, f"The request body must be a JSON object: {message}")
    return APIError(400, f"{param}: {message} (got {json.dumps(first.get('input'))[:80]})", param=param)


async def _parse(request: Request, schema: type[_R]) -> _R:
    # A browser may post a text/plain body to any address without asking first (a "simple" cross-site
    # request); requiring JSON's content type makes it ask, and a key-less local server then stays private.
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(
            415, f"The request body must be sent as application/json, not {content_type or 'untyped'}"
        )
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is larger than the limit of {MAX_BODY_BYTES} bytes")
    try:
        parsed = schema.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise _describe(exc) from None
    extra = parsed.model_extra or {}
    for name in REFUSED_OPTIONS:
        if extra.get(name) is not None:
            raise APIError(400, f"{name} is not supported by tinylm's server", param=name)
    for name in UNSUPPORTED_OPTIONS:
        if extra.get(name):
            raise APIError(400, f"{name} is not supported by tinylm's server", param=name)
    return parsed


# --- rendering prompts --------------------------------------------------------------------------------


def chat_prompt(tokenizer: TextTokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """Prompt ids for a conversation, on the training template (see the module docstring for the rules)."""
    try:
        turns = conversation_turns(((m.role, m.content or "") for m in messages), answered=False)
    except ConversationError as exc:
        raise APIError(400, f"messages: {exc}", param="messages") from None
    question = turns[-1]
    # No budget: the caller reports a prompt that does not fit instead of dropping turns silently.
    return TEMPLATE.encode_chat(
        tokenizer, turns[:-1], question.instruction, question.context, max_prompt_tokens=None
    ).ids


def model_id(loaded: LoadedModel) -> str:
    """The run folder's name for a run's best or latest checkpoint, else the checkpoint file's stem."""
    path = Path(loaded.path).resolve()
    return path.parent.name if path.name in (BEST, LATEST) else path.stem


# --- the worker ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One request's answers (one generation request per choice), and the queue their chunks travel on
    from the worker thread to the event loop."""

    requests: list[GenerationRequest]
    loop: asyncio.AbstractEventLoop
    # With echo: each choice's prompt log-probabilities, filled in by the worker before its first chunk.
    echo: bool = False
    prompt_logprobs: list[list[TokenLogprob | None]] = field(default_factory=list)
    events: asyncio.Queue[tuple[int, Chunk] | Exception] = field(default_factory=asyncio.Queue)
    # Set by the event loop when the client has gone; the worker then drops the job's rows.
    cancelled: bool = False

    @property
    def generates(self) -> bool:
        return self.requests[0].sampling.max_new_tokens > 0

    def send(self, item: tuple[int, Chunk] | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled = True

    async def chunks(self) -> AsyncIterator[tuple[int, Chunk]]:
        """(choice, chunk) pairs until every choice has finished; leaving early cancels the job."""
        remaining = len(self.requests)
        try:
            while remaining:
                item = await self.events.get()
                if isinstance(item, Exception):
                    raise APIError(500, f"generation failed: {item}", kind="server_error") from item
                remaining -= item[1].finish_reason is not None
                yield item
        finally:
            self.cancelled = True


class Scheduler:
    """Owns one model's live batch: a single worker thread admits queued jobs between decode steps, up to
    `max_batch_size` rows, and drops the rows of finished or abandoned ones at once."""

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int):
        self.loaded = loaded
        self.engine = Engine(loaded.model, loaded.tokenizer)
        self.max_batch_size = max_batch_size
        self._batch = Batch(self.engine)
        self._owners: dict[int, tuple[Job, int, Row]] = {}  # id(row) -> (job, choice, row)
        self._waiting: deque[Job] = deque()
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"tinylm-{model_id(loaded)}", daemon=True)

    @property
    def running(self) -> int:
        """Rows in the live batch now."""
        return len(self._batch)

    @property
    def waiting(self) -> int:
        """Jobs queued for room in the batch."""
        return len(self._waiting) + self._inbox.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            if not self._batch and not self._waiting:
                first = self._inbox.get()  # idle: block until there is work
                if first is None:
                    break
                self._waiting.append(first)
            while True:
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                self._waiting.append(job)
            if stopping:
                break
            self._drop_cancelled()
            self._admit()
            self._step()
        gone = APIError(503, "the server is shutting down", kind="server_error")
        for job in {*self._waiting, *(owner[0] for owner in self._owners.values())}:
            job.send(gone)

    def _drop_cancelled(self) -> None:
        self._waiting = deque(job for job in self._waiting if not job.cancelled)
        gone = [row for job, _, row in self._owners.values() if job.cancelled]
        if gone:
            self._batch.remove(gone)
            for row in gone:
                del self._owners[id(row)]

    def _admit(self) -> None:
        """Prefill waiting jobs (oldest first) that fit beside the running rows, in one pass."""
        admitted: list[Job] = []
        room = self.max_batch_size - len(self._batch)
        while self._waiting:
            job = self._waiting[0]
            # A job larger than the whole batch runs alone rather than never.
            fits = len(job.requests) <= room or not (self._batch or admitted)
            if job.generates and not fits:
                break
            self._waiting.popleft()
            try:
                if job.echo:
                    top = job.requests[0].logprobs
                    job.prompt_logprobs = [
                        self.engine.prompt_logprobs(r.prompt, top=top or 0) for r in job.requests
                    ]
            except Exception as exc:
                logger.exception("scoring a prompt failed")
                job.send(exc)
                continue
            if not job.generates:  # max_tokens 0: the prompt's scores were all it asked for
                for choice, request in enumerate(job.requests):
                    job.send((choice, Chunk("", finish_reason="length", prompt_tokens=len(request.prompt))))
                continue
            admitted.append(job)
            room -= len(job.requests)
        if not admitted:
            return
        try:
            rows = self._batch.add([request for job in admitted for request in job.requests])
        except Exception as exc:  # the server lives on; these requests get a 500
            logger.exception("prefill failed for %d requests", len(admitted))
            for job in admitted:
                job.send(exc)
            return
        owners = [(job, choice) for job in admitted for choice in range(len(job.requests))]
        for (job, choice), row in zip(owners, rows, strict=True):
            self._owners[id(row)] = (job, choice, row)
        logger.debug("batch of %d rows after %d requests joined", len(self._batch), len(admitted))

    def _step(self) -> None:
        if not self._batch:
            return
        try:
            chunks = self._batch.step()
        except Exception as exc:  # the server lives on; the requests in this batch get a 500
            logger.exception("generation failed for a batch of %d rows", len(self._batch))
            for job in {owner[0] for owner in self._owners.values()}:
                job.send(exc)
            self._batch.remove([owner[2] for owner in self._owners.values()])
            self._owners.clear()
            return
        for row, chunk in chunks:
            job, choice, _ = self._owners[id(row)]
            if chunk.finish_reason is not None:
                del self._owners[id(row)]
            if not job.cancelled:
                job.send((choice, chunk))


# --- answers ------------------------------------------------------------------------------------------


@dataclass
class _Served:
    id: str
    loaded: LoadedModel
    scheduler: Scheduler
    created: int

    @property
    def window(self) -> int:
        return self.loaded.config.model.max_seq_length

    def job(
        self, prompts: list[list[int]], request: _Request, *, max_tokens: int | None, stop: tuple[str, ...]
    ) -> Job:
        """Check the lengths against the window, fill in the checkpoint's sampling defaults, make the job."""
        top = request.top_logprobs_wanted()
        longest = max(len(p) for p in prompts)
        echo = bool(getattr(request, "echo", False))
        if longest >= self.window and not (echo and max_tokens == 0 and longest == self.window):
            raise APIError(
                400,
                f"This model's context window is {self.window} tokens, and the prompt uses {longest}, "
                "leaving no room for an answer. Shorten the prompt.",
                param="messages" if isinstance(request, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        room = self.window - longest
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"This model's context window is {self.window} tokens; the prompt uses {longest}, so "
                f"max_tokens can be at most {room}, but it is {max_tokens}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        defaults = self.loaded.config.sampling
        options: dict[str, Any] = {
            "max_new_tokens": min(defaults.max_new_tokens, room) if max_tokens is None else max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "min_p": request.min_p,
            "repetition_penalty": request.repetition_penalty,
        }
        sampling = replace(defaults, **{k: v for k, v in options.items() if v is not None})
        n = request.n or 1
        if len(prompts) * n > MAX_ROWS_PER_REQUEST:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={n} is {len(prompts) * n} answers; at most "
                f"{MAX_ROWS_PER_REQUEST} per request",
                param="n",
            )
        requests = [
            GenerationRequest(prompt, sampling, stop, _choice_seed(request.seed, choice), top)
            for prompt in prompts
            for choice in range(n)
        ]
        return Job(requests, asyncio.get_running_loop(), echo=echo)


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i of a seeded request draws from seed + i, so n choices differ and choice 0 is the seed's."""
    return None if seed is None else (seed + choice) % (1 << 64) if choice else seed


def _stops(request: _Request) -> tuple[str, ...]:
    return (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())


def _usage(prompts: Sequence[Sequence[int]], finals: Sequence[Chunk]) -> dict[str, int]:
    prompt_tokens = sum(map(len, prompts))
    completion_tokens = sum(c.completion_tokens for c in finals)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class _Logprobs:
    """One choice's log-probabilities in its endpoint's shape, built up chunk by chunk.

    Completions report parallel lists (tokens, token_logprobs, top_logprobs as {token: logprob} including
    the chosen token, text_offset into the choice's text); chat reports a `content` list of entries.
    """

    def __init__(self, chat: bool):
        self.chat = chat
        self.offset = 0

    def shape(self, entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries if e is not None], "refusal": None}
        shaped: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for entry in entries:
            if entry is None:  # a prompt's first token has nothing before it to be predicted from
                continue
            shaped["tokens"].append(entry.text)
            shaped["token_logprobs"].append(entry.logprob)
            top = {text: value for _, text, value in entry.top}
            shaped["top_logprobs"].append({entry.text: entry.logprob, **top})
            shaped["text_offset"].append(self.offset)
            self.offset += len(entry.text)
        return shaped

    def echo(self, first: str, entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        """A completion prompt's entries: its first token (text `first`) has nothing before it to be
        predicted from, so it is listed with a null log-probability, as OpenAI does."""
        shaped: dict[str, list[Any]] = {
            "tokens": [first],
            "token_logprobs": [None],
            "top_logprobs": [None],
            "text_offset": [0],
        }
        self.offset += len(first)
        return _merge(shaped, self.shape(entries[1:]))

    @staticmethod
    def _chat_entry(entry: TokenLogprob) -> dict[str, Any]:
        return {
            "token": entry.text,
            "logprob": entry.logprob,
            "bytes": _token_bytes(entry.text),
            "top_logprobs": [
                {"token": text, "logprob": value, "bytes": _token_bytes(text)} for _, text, value in entry.top
            ],
        }


@dataclass(frozen=True)
class _Shape:
    """What differs between the two endpoints' answers: their names, and where a choice's text goes."""

    object: str
    chunk_object: str
    id_prefix: str
    chat: bool

    def choice(
        self, row: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One choice of a whole answer."""
        where = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": row, **where, "logprobs": logprobs, "finish_reason": finish_reason}

    def delta(
        self, row: int, text: str, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One choice of a streamed chunk."""
        if not self.chat:
            return self.choice(row, text, finish_reason, logprobs)
        delta = {"content": text} if text else {}
        return {"index": row, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening(self, rows: int) -> list[dict[str, Any]]:
        """A chat stream first announces the assistant's role, as OpenAI's does."""
        announce = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [{"index": row, **announce} for row in range(rows)] if self.chat else []


CHAT = _Shape("chat.completion", "chat.completion.chunk", "chatcmpl-", chat=True)
COMPLETION = _Shape("text_completion", "text_completion", "cmpl-", chat=False)


def _merge(into: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    """Append one chunk's shaped log-probabilities to a choice's."""
    if into is None:
        return {key: list(value) if isinstance(value, list) else value for key, value in more.items()}
    for key, value in more.items():
        if isinstance(value, list):
            into[key].extend(value)
    return into


async def _client_gone(connection: Request) -> None:
    """Return once the client has closed the connection (listening as Starlette's StreamingResponse does)."""
    while (await connection.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(connection: Request, answer: Coroutine[Any, Any, _T]) -> _T | Response:
    """`answer`'s result; or, when the client leaves first, `answer` cancelled: that leaves `Job.chunks`
    early, which cancels the job as a closed stream does, so its rows leave before the next decode step."""
    answering = asyncio.create_task(answer)
    leaving = asyncio.create_task(_client_gone(connection))
    try:
        await asyncio.wait((answering, leaving), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answering, leaving):
            task.cancel()
        await asyncio.wait((answering, leaving))
    if answering.cancelled():
        # Nobody reads it: nginx's code for a client that closed its request.
        return Response(status_code=499)
    return answering.result()


async def _answer(
    served: _Served,
    job: Job,
    prompts: list[list[int]],
    request: _Request,
    shape: _Shape,
    *,
    connection: Request,
    prompt_texts: Sequence[str] = (),
):
    """Submit the job; answer with one JSON object, or with server-sent events when `stream` is set.

    Either way the job ends when the client on `connection` goes away, so its rows leave the batch at once.
    With echo (completions), each choice's text starts with its prompt's text (`prompt_texts`).
    """
    head = {
        "id": f"{shape.id_prefix}{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": served.id,
    }
    choices = len(job.requests)
    wants_logprobs = job.requests[0].logprobs is not None
    shapers = [_Logprobs(shape.chat) for _ in range(choices)]
    echoed: set[int] = set()

    def echo(choice: int) -> tuple[str, dict[str, Any] | None]:
        """The prompt's text and log-probabilities before a choice's first chunk (with echo), once."""
        if not job.echo or choice in echoed:
            return "", None
        echoed.add(choice)
        text = prompt_texts[choice // (request.n or 1)]
        if not wants_logprobs:
            return text, None
        first = served.loaded.tokenizer.decode(job.requests[choice].prompt[:1])
        return text, shapers[choice].echo(first, job.prompt_logprobs[choice])

    def piece(choice: int, chunk: Chunk) -> tuple[str, dict[str, Any] | None]:
        """A chunk's text and shaped log-probabilities, after the echoed prompt when it is the first."""
        text, logprobs = echo(choice)
        if wants_logprobs:
            logprobs = _merge(logprobs, shapers[choice].shape(chunk.logprobs))
        return text + chunk.text, logprobs

    async def whole() -> dict[str, Any]:
        texts: list[list[str]] = [[] for _ in range(choices)]
        logprobs: list[dict[str, Any] | None] = [None] * choices
        finals: dict[int, Chunk] = {}
        async for choice, chunk in job.chunks():
            text, more = piece(choice, chunk)
            texts[choice].append(text)
            if more is not None:
                logprobs[choice] = _merge(logprobs[choice], more)
            if chunk.finish_reason:
                finals[choice] = chunk
        return {
            **head,
            "object": shape.object,
            "choices": [
                shape.choice(choice, "".join(text), finals[choice].finish_reason, logprobs[choice])
                for choice, text in enumerate(texts)
            ],
            "usage": _usage(prompts, list(finals.values())),
        }

    served.scheduler.submit(job)
    if not request.stream:
        return await _unless_client_leaves(connection, whole())

    include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {**head, "object": shape.chunk_object, "choices": choices, **extra}
        if include_usage:
            payload.setdefault("usage", None)
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        finals: list[Chunk] = []
        try:
            if opening := shape.opening(choices):
                yield event(opening)
            async for choice, chunk in job.chunks():
                text, logprobs = piece(choice, chunk)
                if text or logprobs:
                    yield event([shape.delta(choice, text, logprobs=logprobs)])
                if chunk.finish_reason:
                    finals.append(chunk)
                    yield event([shape.delta(choice, "", chunk.finish_reason)])
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        if include_usage:
            yield event([], usage=_usage(prompts, finals))
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# --- the app ------------------------------------------------------------------------------------------


def create_app(*models: LoadedModel, api_key: str | None = None, max_batch_size: int = 16) -> FastAPI:
    """The API for one or more loaded models; `api_key` (if given) is required as a bearer token on /v1
    and on /tokenize and /detokenize. `max_batch_size` bounds each model's live batch (rows).

    Each model's worker thread runs during the app's lifespan, which uvicorn (or `with TestClient(app)`) runs.
    FastAPI's /docs pages are off: they load their scripts from the internet.
    """
    if not models:
        raise ValueError("create_app needs at least one model")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    served: dict[str, _Served] = {}
    for loaded in models:
        name = model_id(loaded)
        if name in served:
            raise ServeError(
                f"two checkpoints have the model id {name!r}: {served[name].loaded.path}, {loaded.path}"
            )
        created = int(Path(loaded.path).stat().st_mtime) if Path(loaded.path).exists() else int(time.time())
        served[name] = _Served(name, loaded, Scheduler(loaded, max_batch_size=max_batch_size), created)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for model in served.values():
            model.scheduler.start()
        yield
        for model in served.values():
            await asyncio.to_thread(model.scheduler.stop)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(
                401,
                "No API key given: send it as the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key", code="invalid_api_key")

    def find(name: str | None) -> _Served:
        if name is None:
            if len(served) == 1:
                return next(iter(served.values()))
            raise APIError(400, f"model: name one of {', '.join(map(repr, served))}", param="model")
        if name not in served:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server has {', '.join(map(repr, served))}",
                param="model",
                code="model_not_found",
            )
        return served[name]

    def describe(model: _Served) -> dict[str, Any]:
        return {
            "id": model.id,
            "object": "model",
            "created": model.created,
            "owned_by": "tinylm",
            # The context window, under the names vLLM and OpenRouter use, so clients can fit prompts.
            "max_model_len": model.window,
            "context_length": model.window,
        }

    app = FastAPI(title="tinylm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    keyed = [Depends(check_key)]
    v1 = APIRouter(prefix="/v1", dependencies=keyed)
    tools = APIRouter(dependencies=keyed)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and each model's live batch: rows running and requests waiting for room."""
        batches = {
            name: {"running": m.scheduler.running, "waiting": m.scheduler.waiting}
            for name, m in served.items()
        }
        return {"status": "ok", "models": list(served), "batches": batches}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [describe(m) for m in served.values()]}

    @v1.get("/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        return describe(find(name))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatRequest)
        model = find(body.model)
        prompt = await asyncio.to_thread(chat_prompt, model.loaded.tokenizer, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = model.job([prompt], body, max_tokens=max_tokens, stop=(*TEMPLATE.stop_strings, *_stops(body)))
        return await _answer(model, job, [prompt], body, CHAT, connection=request)

    @v1.post("/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        model = find(body.model)
        tokenizer = model.loaded.tokenizer
        given = (
            [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
        )
        if all(isinstance(p, str) for p in given):
            texts = [str(p) for p in given]
            prompts = await asyncio.to_thread(
                lambda: [tokenizer.encode(t) or [tokenizer.eos_id] for t in texts]
            )
        else:
            prompts = [list(p) for p in given if not isinstance(p, str)]
            _check_ids(prompts, model.loaded.config.model.vocab_size)
            texts = [tokenizer.decode(p) for p in prompts]
        job = model.job(prompts, body, max_tokens=body.max_tokens, stop=_stops(body))
        return await _answer(model, job, prompts, body, COMPLETION, connection=request, prompt_texts=texts)

    @tools.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        """Text to token ids with this model's tokenizer (llama.cpp's /tokenize; `with_pieces` adds each
        token's text)."""
        body = await _parse(request, TokenizeRequest)
        text = body.content if body.content is not None else body.prompt
        if text is None:
            raise APIError(400, "content: Field required (the text to tokenize)", param="content")
        tokenizer = find(body.model).loaded.tokenizer
        ids = tokenizer.encode(text)
        if body.add_special:  # tinylm's only special token starts every training record
            ids = [tokenizer.eos_id, *ids]
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": tokenizer.decode([i])} for i in ids]}
        return {"tokens": ids}

    @tools.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        """Token ids to text (llama.cpp's /detokenize; `prompt` repeats it under vLLM's name)."""
        body = await _parse(request, DetokenizeRequest)
        model = find(body.model)
        _check_ids([body.tokens], model.loaded.config.model.vocab_size, param="tokens")
        text = model.loaded.tokenizer.decode(body.tokens)
        return {"content": text, "prompt": text}

    @tools.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict[str, Any]:
        """vLLM's description of the tokenizer, which lm-evaluation-harness's remote tokenizer reads."""
        served_model = find(model)
        tokenizer = served_model.loaded.tokenizer
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.decode([tokenizer.eos_id]),
            "bos_token": None,
            "pad_token": None,
            "model_max_length": served_model.window,
            "chat_template": None,
        }

    app.include_router(v1)
    app.include_router(tools)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this answer, so uvicorn logs its traceback.
        body = APIError(500, f"internal error: {type(exc).__name__}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    return app


def _check_ids(prompts: Sequence[Sequence[int]], vocab_size: int, *, param: str = "prompt") -> None:
    for prompt in prompts:
        for token in prompt:
            if token >= vocab_size:
                raise APIError(
                    400,
                    f"{param}: token id {token} is outside this model's vocabulary (0 to {vocab_size - 1})",
                    param=param,
                )


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line ServeError (port taken, unknown host) before any model work."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # Made with its protocol named (as asyncio's own listeners are), so that asyncio turns Nagle's
        # algorithm off on each connection: otherwise every response waits tens of milliseconds for the
        # client's delayed acknowledgement of its headers before its body goes out.
        sock = socket.socket(family, kind, proto)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen()
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(
    models: Sequence[LoadedModel],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 16,
) -> None:
    """Run the API under uvicorn until Ctrl-C (or SIGTERM). Binds to 127.0.0.1 unless told otherwise."""
    app = create_app(*models, api_key=api_key, max_batch_size=max_batch_size)
    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    shown = f"[{host}]" if ":" in host else host
    logger.info(
        "serving %s at http://%s:%d/v1 (OpenAI-compatible; %s)",
        ", ".join(model_id(m) for m in models),
        shown,
        sock.getsockname()[1],
        "API key required" if api_key else "no API key",
    )
    # uvicorn shuts down gracefully on Ctrl-C, then re-raises it; stopping is this command's normal end.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
