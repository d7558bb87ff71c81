"""An OpenAI-compatible HTTP API: a thin FastAPI layer over `Engine.stream_batch`.

Any client of OpenAI's API (the `openai` libraries, chat front ends, editors) can talk to a tinylm model:
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events when
`stream` is true) and `GET /health`.

How OpenAI's notions map onto a tinylm model:

- Model id: the name of the run folder for a run folder or its `best_model.pt` / `latest.pt`, else the
  checkpoint file's stem (`runs/demo` and `runs/demo/best_model.pt` are both "demo";
  `runs/demo/checkpoint_step_500.pt` is "checkpoint_step_500").
- Chat: messages are rendered through the prompt template the model was trained on. Earlier user/assistant
  pairs become earlier turns; consecutive messages of one role are joined by a blank line. The template has
  no slot for a system prompt but one for a context passage (Dolly's `context`), so system (and developer)
  messages become the context passage of the last user message: put a passage to answer from there. The
  end of a turn ("### Instruction:") is always a stop string.
- Completions: the prompt is raw text, continued as is (no template); an empty prompt starts after
  end-of-text, where every training record starts.
- Limits: the prompt plus max_tokens must fit the context window. Nothing is trimmed or dropped silently:
  a prompt that leaves no room, or a max_tokens that does not fit, is a 400 error naming the numbers.
  Without max_tokens, an answer gets the checkpoint's max_new_tokens or what fits, whichever is less.
- Sampling: temperature, top_p and seed as OpenAI defines them; the checkpoint's sampling config fills in
  what a request leaves out, and top_k, min_p and repetition_penalty may be sent as extra fields.

Generation runs on one worker thread per model, never on the event loop. Requests that arrive while the
model is busy wait; the worker then answers up to `max_batch_size` of them in one batched pass when they
sample alike (a seeded sampled request runs alone, so its seed alone decides its tokens). Each row of a
batch gets the same tokens as it would alone, and streams as it is generated.
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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from tinylm.checkpoint import BEST, LATEST, LoadedModel
from tinylm.config import SamplingConfig
from tinylm.generate import Chunk, Engine
from tinylm.prompts import TEMPLATE, ConversationError, TextTokenizer, conversation_turns

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
# How long the worker waits for more requests to join a batch (see BatchScheduler._collect): this share
# of the last batch's time, at most BATCH_WAIT_MAX_S.
BATCH_WAIT_SHARE = 0.1
BATCH_WAIT_MAX_S = 0.25
# Rows one request may ask for (prompts x n); a batch may hold several requests' rows.
MAX_ROWS_PER_REQUEST = 16
# OpenAI options whose meaning this server cannot honour; sending one (with a non-empty value) is a 400
# rather than an answer that silently ignores it. Other unknown fields are ignored, as OpenAI's clients
# send extras (user, metadata, ...).
UNSUPPORTED_OPTIONS = (
    "logprobs",
    "top_logprobs",
    "echo",
    "suffix",
    "logit_bias",
    "tools",
    "functions",
    "frequency_penalty",
    "presence_penalty",
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


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Request(BaseModel):
    """Fields both endpoints share; unknown fields are kept in `model_extra` to check UNSUPPORTED_OPTIONS."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    n: int | None = Field(None, ge=1, le=MAX_ROWS_PER_REQUEST)
    stop: _StopString | Annotated[list[_StopString], Field(max_length=4)] | None = None
    # The range torch.Generator.manual_seed accepts.
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


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


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_ROWS_PER_REQUEST)]


_R = TypeVar("_R", bound=_Request)


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
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is larger than the limit of {MAX_BODY_BYTES} bytes")
    try:
        parsed = schema.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise _describe(exc) from None
    for name in UNSUPPORTED_OPTIONS:
        if (parsed.model_extra or {}).get(name):
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
    """One request's rows, and the queue its chunks travel on from the worker thread to the event loop."""

    rows: list[list[int]]
    sampling: SamplingConfig
    stop: tuple[str, ...]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[int, Chunk] | Exception] = field(default_factory=asyncio.Queue)
    # Set by the event loop when the client has gone; the worker then stops generating for it.
    cancelled: bool = False

    def batch_key(self) -> object:
        """Jobs with equal keys can share forward passes: they pick tokens by the same rule."""
        if self.sampling.temperature == 0:
            return ("greedy", self.sampling.repetition_penalty)
        if self.seed is not None:
            return ("alone", id(self))  # one generator per batch: a seed decides its tokens only alone
        return replace(self.sampling, max_new_tokens=0)

    def send(self, item: tuple[int, Chunk] | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled = True

    async def chunks(self) -> AsyncIterator[tuple[int, Chunk]]:
        """(row, chunk) pairs until every row has finished; leaving early cancels the job."""
        remaining = len(self.rows)
        try:
            while remaining:
                item = await self.events.get()
                if isinstance(item, Exception):
                    raise APIError(500, f"generation failed: {item}", kind="server_error") from item
                remaining -= item[1].finish_reason is not None
                yield item
        finally:
            self.cancelled = True


class BatchScheduler:
    """Owns one model: a single worker thread answers queued jobs, batching the ones that sample alike."""

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int):
        self.loaded = loaded
        self.engine = Engine(loaded.model, loaded.tokenizer)
        self.max_batch_size = max_batch_size
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"tinylm-{model_id(loaded)}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def _run(self) -> None:
        waiting: list[Job] = []
        rows, seconds = 1, 0.0  # of the last batch
        while self._collect(waiting, rows, min(BATCH_WAIT_MAX_S, BATCH_WAIT_SHARE * seconds)):
            waiting = [job for job in waiting if not job.cancelled]
            if waiting:
                batch = self._take_batch(waiting)
                waiting = [job for job in waiting if job not in batch]
                rows, started = sum(len(job.rows) for job in batch), time.perf_counter()
                self._answer(batch)
                seconds = time.perf_counter() - started
        for job in waiting:
            job.send(APIError(503, "the server is shutting down", kind="server_error"))

    def _collect(self, waiting: list[Job], expected: int, wait: float) -> bool:
        """Move queued jobs into `waiting`; False once stop() was called.

        Blocks for a first job, then waits up to `wait` seconds while fewer rows wait than `expected`:
        clients answered by one batch ask again at about the same time, but not at once (tens of
        milliseconds apart on a busy machine), and would otherwise be split into a batch of the first
        and a batch of the rest. Waiting a share of a batch's time keeps the cost to latency that share.
        """
        deadline = time.monotonic() + wait if waiting else None
        while True:
            short = sum(len(job.rows) for job in waiting) < min(expected, self.max_batch_size)
            try:
                if not waiting:
                    job = self._inbox.get()
                elif short and deadline is not None and time.monotonic() < deadline:
                    job = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    job = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            waiting.append(job)
            deadline = deadline or time.monotonic() + wait

    def _take_batch(self, waiting: list[Job]) -> list[Job]:
        """The oldest job, and younger ones that sample alike, up to max_batch_size rows."""
        first = waiting[0]
        batch, rows = [first], len(first.rows)
        for job in waiting[1:]:
            if job.batch_key() == first.batch_key() and rows + len(job.rows) <= self.max_batch_size:
                batch.append(job)
                rows += len(job.rows)
        return batch

    def _answer(self, batch: list[Job]) -> None:
        owners = [(job, row) for job in batch for row in range(len(job.rows))]
        logger.debug("answering a batch of %d rows from %d requests", len(owners), len(batch))
        unfinished = {job: len(job.rows) for job in batch}
        steps = self.engine.stream_batch(
            [job.rows[row] for job, row in owners],
            batch[0].sampling,
            stops=[job.stop for job, _ in owners],
            max_new_tokens=[job.sampling.max_new_tokens for job, _ in owners],
            seed=batch[0].seed,
        )
        try:
            with contextlib.closing(steps):
                for chunks in steps:
                    for (job, row), chunk in zip(owners, chunks, strict=True):
                        if chunk is not None and not job.cancelled:
                            job.send((row, chunk))
                            unfinished[job] -= chunk.finish_reason is not None
                    if all(job.cancelled or unfinished[job] == 0 for job in batch):
                        return
        except Exception as exc:  # the server lives on; the requests in this batch get a 500
            logger.exception("generation failed for a batch of %d rows", len(owners))
            for job in batch:
                job.send(exc)


# --- the app ------------------------------------------------------------------------------------------


@dataclass
class _Served:
    id: str
    loaded: LoadedModel
    scheduler: BatchScheduler
    created: int

    @property
    def window(self) -> int:
        return self.loaded.config.model.max_seq_length

    def job(
        self, prompts: list[list[int]], request: _Request, *, max_tokens: int | None, stop: tuple[str, ...]
    ) -> Job:
        """Check the lengths against the window, fill in the checkpoint's sampling defaults, make the job."""
        longest = max(len(p) for p in prompts)
        if longest >= self.window:
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
            "max_new_tokens": max_tokens or min(defaults.max_new_tokens, room),
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "min_p": request.min_p,
            "repetition_penalty": request.repetition_penalty,
        }
        sampling = replace(defaults, **{k: v for k, v in options.items() if v is not None})
        rows = [p for p in prompts for _ in range(request.n or 1)]
        if len(rows) > MAX_ROWS_PER_REQUEST:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={request.n} is {len(rows)} answers; at most "
                f"{MAX_ROWS_PER_REQUEST} per request",
                param="n",
            )
        return Job(rows, sampling, stop, request.seed, asyncio.get_running_loop())


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


@dataclass(frozen=True)
class _Shape:
    """What differs between the two endpoints' answers: their names, and where a choice's text goes."""

    object: str
    chunk_object: str
    id_prefix: str
    chat: bool

    def choice(self, row: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        """One choice of a whole answer."""
        where = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": row, **where, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, row: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        """One choice of a streamed chunk."""
        if not self.chat:
            return self.choice(row, text, finish_reason)
        delta = {"content": text} if text else {}
        return {"index": row, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening(self, rows: int) -> list[dict[str, Any]]:
        """A chat stream first announces the assistant's role, as OpenAI's does."""
        announce = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [{"index": row, **announce} for row in range(rows)] if self.chat else []


CHAT = _Shape("chat.completion", "chat.completion.chunk", "chatcmpl-", chat=True)
COMPLETION = _Shape("text_completion", "text_completion", "cmpl-", chat=False)


async def _answer(served: _Served, job: Job, prompts: list[list[int]], request: _Request, shape: _Shape):
    """Submit the job; answer with one JSON object, or with server-sent events when `stream` is set."""
    head = {
        "id": f"{shape.id_prefix}{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": served.id,
    }
    served.scheduler.submit(job)
    if not request.stream:
        texts: list[list[str]] = [[] for _ in job.rows]
        finals: dict[int, Chunk] = {}
        async for row, chunk in job.chunks():
            texts[row].append(chunk.text)
            if chunk.finish_reason:
                finals[row] = chunk
        choices = [
            shape.choice(row, "".join(text), finals[row].finish_reason) for row, text in enumerate(texts)
        ]
        return {
            **head,
            "object": shape.object,
            "choices": choices,
            "usage": _usage(prompts, list(finals.values())),
        }

    include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {**head, "object": shape.chunk_object, "choices": choices, **extra}
        if include_usage:
            payload.setdefault("usage", None)
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        finals: list[Chunk] = []
        try:
            if opening := shape.opening(len(job.rows)):
                yield event(opening)
            async for row, chunk in job.chunks():
                if chunk.text:
                    yield event([shape.delta(row, chunk.text)])
                if chunk.finish_reason:
                    finals.append(chunk)
                    yield event([shape.delta(row, "", chunk.finish_reason)])
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


def create_app(*models: LoadedModel, api_key: str | None = None, max_batch_size: int = 16) -> FastAPI:
    """The API for one or more loaded models; `api_key` (if given) is required as a bearer token on /v1.

    Each model's worker thread runs during the app's lifespan, which uvicorn (or `with TestClient(app)`) runs.
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
        served[name] = _Served(name, loaded, BatchScheduler(loaded, max_batch_size=max_batch_size), created)

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

    def find(name: str) -> _Served:
        if name not in served:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server has {', '.join(map(repr, served))}",
                param="model",
                code="model_not_found",
            )
        return served[name]

    def describe(model: _Served) -> dict[str, Any]:
        return {"id": model.id, "object": "model", "created": model.created, "owned_by": "tinylm"}

    app = FastAPI(title="tinylm", lifespan=lifespan)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(served)}

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
        return await _answer(model, job, [prompt], body, CHAT)

    @v1.post("/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        model = find(body.model)
        tokenizer = model.loaded.tokenizer
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompts = await asyncio.to_thread(lambda: [tokenizer.encode(t) or [tokenizer.eos_id] for t in texts])
        job = model.job(prompts, body, max_tokens=body.max_tokens, stop=_stops(body))
        return await _answer(model, job, prompts, body, COMPLETION)

    app.include_router(v1)

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


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line ServeError (port taken, unknown host) before any model work."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
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
