"""The OpenAI-compatible API, driven by the official `openai` client against uvicorn on a free local port."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from tinylm.checkpoint import LoadedModel, load_model, save_checkpoint
from tinylm.cli import main
from tinylm.config import Config
from tinylm.generate import Engine
from tinylm.model import TinyLM
from tinylm.prompts import TEMPLATE
from tinylm.server import ChatMessage, chat_prompt, create_app, listen
from tinylm.tokenizer import ByteTokenizer

WINDOW = 128
MODEL = "run"
QUESTION = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}


def tiny_letters_model(config: Config) -> TinyLM:
    """A random 2-layer model whose output layer can only pick lowercase letters and spaces.

    Its greedy answers are then fixed, varied, printable text, so answers and stop strings can be checked
    exactly; the prompt still decides what comes out.
    """
    torch.manual_seed(0)
    model = TinyLM(config.model).eval()
    allowed = torch.full((config.model.vocab_size,), -1e4)
    allowed[[ord(" "), *range(ord("a"), ord("z") + 1)]] = 0.0
    with torch.no_grad():
        model.head.bias += allowed
    return model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, make_config) -> LoadedModel:
    config = make_config()
    config = replace(config, model=replace(config.model, max_seq_length=WINDOW))
    run = tmp_path_factory.mktemp("serve") / MODEL
    save_checkpoint(
        run / "best_model.pt",
        model=tiny_letters_model(config),
        config=config,
        tokenizer=ByteTokenizer(),
        step=0,
    )
    return load_model(run)


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def base_url(loaded) -> Iterator[str]:
    with running(create_app(loaded)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def reference(
    loaded: LoadedModel, prompt: list[int], max_tokens: int, *, chat: bool = True, seed=None, **sampling
):
    """What the library itself answers: the server must say exactly this."""
    options = replace(loaded.config.sampling, max_new_tokens=max_tokens, **sampling)
    stop = TEMPLATE.stop_strings if chat else ()
    return Engine(loaded.model, loaded.tokenizer).complete(prompt, options, stop=stop, seed=seed)


def chat_ids(loaded: LoadedModel, question: str) -> list[int]:
    return TEMPLATE.encode_prompt(loaded.tokenizer, question)


def streamed_chat(client: openai.OpenAI, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "tinylm"
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["models"] == [MODEL]
    assert set(health["batches"][MODEL]) == {"running", "waiting"}


def test_chat_answers_what_generate_answers(client, loaded):
    expected = reference(loaded, chat_ids(loaded, "hi"), 20, temperature=0.0)
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == "length"
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(chat_ids(loaded, "hi")), 20)
    assert usage.total_tokens == usage.prompt_tokens + 20


def test_chat_streams_the_same_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    text, chunks = streamed_chat(
        client, messages=QUESTION, max_tokens=20, temperature=0, stream_options={"include_usage": True}
    )
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 3  # piece by piece, not in one go
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    # Without stream_options, no usage chunk: the last chunk carries the finish_reason.
    _, plain = streamed_chat(client, messages=QUESTION, max_tokens=5, temperature=0)
    assert plain[-1].choices[0].finish_reason == "length"


def test_completions_continue_raw_text(client, loaded):
    prompt = "the cat"
    expected = reference(loaded, loaded.tokenizer.encode(prompt), 15, chat=False, temperature=0.0)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 15)
    chunks = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_with_several_prompts_answer_each(client, loaded):
    prompts = ["one", "a longer prompt"]
    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    expected = [
        reference(loaded, loaded.tokenizer.encode(p), 8, chat=False, temperature=0.0).text for p in prompts
    ]
    assert [c.index for c in answer.choices] == [0, 1]
    assert [c.text for c in answer.choices] == expected
    assert answer.usage.prompt_tokens == sum(map(len, prompts))
    assert answer.usage.completion_tokens == 16


def test_stop_sequences_end_the_answer_before_them(client, loaded):
    free = reference(loaded, chat_ids(loaded, "hi"), 40, temperature=0.0).text
    # A 3-letter piece of the free answer that first occurs after its start.
    start = next(i for i in range(1, len(free) - 3) if free.find(free[i : i + 3]) == i)
    stop = free[start : start + 3]
    for stop_field in (stop, [stop, "zzzzzz"]):
        answer = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=40, temperature=0, stop=stop_field
        )
        assert answer.choices[0].message.content == free[:start]
        assert answer.choices[0].finish_reason == "stop"
        # One byte-level token per letter: generation stopped on the stop string's last token.
        assert answer.usage.completion_tokens == start + 3
    text, chunks = streamed_chat(client, messages=QUESTION, max_tokens=40, temperature=0, stop=stop)
    assert text == free[:start] and stop not in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_a_sampled_answer_reproducible(client, loaded):
    def ask(seed: int, **kwargs) -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=30, temperature=1.0, top_p=1.0, seed=seed, **kwargs
        )
        return answer.choices[0].message.content

    first = ask(7)
    assert ask(7) == first
    assert first == reference(loaded, chat_ids(loaded, "hi"), 30, temperature=1.0, top_p=1.0, seed=7).text
    assert ask(8) != first
    assert (
        streamed_chat(client, messages=QUESTION, max_tokens=30, temperature=1.0, top_p=1.0, seed=7)[0]
        == first
    )
    several = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=30, temperature=1.0, seed=7, n=3
    )
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert len({c.message.content for c in several.choices}) == 3
    assert several.usage.completion_tokens == 90


def test_messages_render_through_the_training_template(loaded):
    messages = [
        ChatMessage(role="system", content="the passage"),
        ChatMessage(role="user", content="q1"),
        ChatMessage(role="assistant", content="a1"),
        ChatMessage(role="user", content="q2"),
        ChatMessage(role="user", content="more"),
    ]
    text = loaded.tokenizer.decode(chat_prompt(loaded.tokenizer, messages))
    assert text == (
        "### Instruction:\nq1\n\n### Response:\na1<|endoftext|>"
        "### Instruction:\nq2\n\nmore\n\n### Context:\nthe passage\n\n### Response:\n"
    )


def test_chat_uses_the_rendered_conversation(client, loaded):
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},
    ]
    parsed = [ChatMessage.model_validate(m) for m in messages]
    expected = reference(loaded, chat_prompt(loaded.tokenizer, parsed), 10, temperature=0.0)
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(chat_prompt(loaded.tokenizer, parsed))


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b"null", None, "JSON object"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model", "Field required"),
        (b'{"model": "run", "messages": []}', "messages", "at least 1"),
        (b'{"model": "run", "messages": "hi"}', "messages", "valid array"),
        (b'{"model": "run", "messages": [{"role": "tool", "content": "x"}]}', "messages[0].role", "'user'"),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            None,
            "text",
        ),
        (b'{"model": "run", "messages": [{"role": "assistant", "content": "x"}]}', "messages", "user"),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "temperature": 3}',
            "temperature",
            "2",
        ),
        (b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p", "0"),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
            "max_tokens",
            "",
        ),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}',
            "stop",
            "4",
        ),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "stop": "'
            + b"s" * 300
            + b'"}',
            "stop",
            "at most 256 characters",
        ),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "stream": "maybe"}',
            "stream",
            "boolean",
        ),
        (b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "n": 99}', "n", "16"),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "tools": []}',
            "tools",
            "not supported",
        ),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "logprobs": "maybe"}',
            "logprobs",
            "boolean",
        ),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "logprobs": true, '
            b'"top_logprobs": 21}',
            "top_logprobs",
            "20",
        ),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
            "top_logprobs",
            "needs logprobs",
        ),
        (
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e-40}',
            "repetition_penalty",
            "0.01",
        ),
    ],
)
def test_malformed_requests_are_400_in_openai_shape(base_url, body, param, words):
    response = httpx.post(f"{base_url}/v1/chat/completions", content=body, headers=JSON, timeout=30)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and words in error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"prompt": [1, 300]}, "prompt", "outside this model's vocabulary (0 to 256)"),
        ({"prompt": [[1], [-1]]}, "prompt", ""),
        ({"prompt": [1, "a"]}, "prompt", ""),
        ({"logprobs": 21}, "logprobs", "20"),
        ({"echo": "maybe"}, "echo", "boolean"),
        ({"max_tokens": 0}, "max_tokens", "only with echo"),
        ({"max_tokens": -1}, "max_tokens", "0"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ],
)
def test_malformed_completion_fields_are_400(base_url, fields, param, words):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"].startswith(param) and words in error["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert raised.value.body["code"] == "model_not_found" and "'run'" in raised.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_a_prompt_that_fills_the_window_is_400_naming_the_limits(client, loaded):
    question = "x" * (WINDOW - len(chat_ids(loaded, "")))
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}])
    body = raised.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert f"{WINDOW} tokens" in body["message"] and f"uses {WINDOW}" in body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="y" * (WINDOW + 5))
    assert raised.value.body["param"] == "prompt" and f"uses {WINDOW + 5}" in raised.value.body["message"]


def test_max_tokens_out_of_range_is_400_naming_the_limits(client, loaded):
    room = WINDOW - len(chat_ids(loaded, "hi"))
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=room + 1)
    assert raised.value.body["param"] == "max_tokens"
    assert f"at most {room}, but it is {room + 1}" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0)
    assert "greater than or equal to 1" in raised.value.body["message"]
    # The largest that fits is fine, and so is leaving it out (what fits, at most the checkpoint's default).
    fits = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=room, temperature=0)
    assert fits.usage.completion_tokens == room
    default = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert default.usage.completion_tokens == min(room, loaded.config.sampling.max_new_tokens)


def test_oversized_body_and_unknown_routes_answer_in_openai_shape(base_url):
    big = httpx.post(f"{base_url}/v1/completions", content=b" " * (2 << 20), headers=JSON, timeout=30)
    assert big.status_code == 413 and "limit" in error_of(big)["message"]
    assert error_of(httpx.get(f"{base_url}/v1/nothing"))["message"] == "Not Found"
    assert httpx.get(f"{base_url}/v1/chat/completions").status_code == 405


def test_api_key_is_required_when_set(loaded):
    with running(create_app(loaded, api_key="secret")) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # health checks need no key
        missing = httpx.get(f"{url}/v1/models")
        assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
        # The key is checked before anything else, even a malformed body.
        assert httpx.post(f"{url}/v1/chat/completions", content=b"{").status_code == 401
        assert httpx.post(f"{url}/tokenize", json={"content": "x"}).status_code == 401
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        assert right.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2).choices


def test_a_failing_model_answers_500_and_the_server_lives_on(loaded, monkeypatch):
    with running(create_app(loaded)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        monkeypatch.setattr(
            loaded.model, "hidden_states", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        )
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3)
        assert "boom" in raised.value.body["message"]
        with pytest.raises(openai.APIError, match="boom"):
            list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, stream=True))
        monkeypatch.undo()
        assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3).choices


def slow_forward_passes(loaded: LoadedModel, monkeypatch, *, seconds: float) -> list[float]:
    """Make every forward pass of the served model take `seconds`; returns when each one began."""
    # Generation runs the model through hidden_states (it applies the output layer to the last position itself).
    hidden_states = loaded.model.hidden_states
    passes: list[float] = []

    def slow(*args, **kwargs):
        passes.append(time.monotonic())
        time.sleep(seconds)
        return hidden_states(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "hidden_states", slow)
    return passes


def test_generation_stops_promptly_for_a_client_that_leaves_mid_stream(loaded, monkeypatch):
    step_s, max_tokens = 0.05, 80  # the whole answer would take 4 s
    steps = slow_forward_passes(loaded, monkeypatch, seconds=step_s)
    with running(create_app(loaded)) as url:
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30
        ) as response:
            lines = (line for line in response.iter_lines() if line)
            assert '"content": ""' in next(lines)  # the role announcement
            assert '"content": "' in next(lines)  # the first piece of the answer: generation is under way
        left = time.monotonic()
        # One worker answers one batch at a time, so the next request is answered only once the worker has
        # dropped the abandoned answer: waiting for it waits for the worker to be free.
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        answer = client.chat.completions.create(**{**body, "max_tokens": 5})
        waited = time.monotonic() - left
    assert answer.usage.completion_tokens == 5
    # The abandoned answer's remaining 78 steps alone would take 3.9 s: it stopped within a few steps.
    assert waited < max_tokens * step_s / 2
    assert len([t for t in steps if t > left]) < 5 + max_tokens // 4


def test_twenty_concurrent_streams_each_get_their_own_answer(base_url, client, caplog):
    questions = [f"question {i}: {'why ' * (i % 5)}" for i in range(20)]

    def ask_alone(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        return streamed_chat(client, messages=messages, max_tokens=12, temperature=0)[0]

    alone = [ask_alone(q) for q in questions]
    assert len(set(alone)) > 5  # the prompts really lead to different answers

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as aclient:

            async def ask(question: str) -> str:
                stream = await aclient.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": question}],
                    max_tokens=12,
                    temperature=0,
                    stream=True,
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            return await asyncio.gather(*(ask(q) for q in questions))

    with caplog.at_level(logging.DEBUG, logger="tinylm.server"):
        together = asyncio.run(ask_all())
    assert together == alone
    sizes = [int(m) for m in re.findall(r"batch of (\d+) rows", caplog.text)]
    assert max(sizes) > 1  # the concurrent requests did share forward passes


def test_tinylm_serve_command(loaded, offline_env, repo_root, capsys):
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "tinylm", "serve", "--checkpoint", str(loaded.path), "--port", str(port)],
        cwd=repo_root,
        env={**offline_env, "TINYLM_API_KEY": "k"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "tinylm serve did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        # The port is taken now: a second server says so in one line, before loading anything.
        assert main(["serve", "--checkpoint", "no/such/run", "--port", str(port)]) == 2
        assert capsys.readouterr().err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert f"serving {MODEL} at http://127.0.0.1:{port}/v1" in output and "API key required" in output
    assert process.returncode == 0 and "Traceback" not in output


def test_model_id_is_the_run_folder_or_file_stem(loaded, tmp_path):
    named = tmp_path / "checkpoint_step_5.pt"
    named.write_bytes(Path(loaded.path).read_bytes())
    app = create_app(loaded, load_model(named))
    with running(app) as url:
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [MODEL, "checkpoint_step_5"]


def test_the_server_imports_no_training_code_or_other_front_end(repo_root):
    tree = ast.parse((repo_root / "tinylm" / "server.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    ours = {name.split(".")[1] for name in imported if name and name.startswith("tinylm.")}
    assert "generate" in ours and not ours & {"train", "data", "chat", "webui", "cli"}


# -- continuous batching under load ---------------------------------------------------------------------


def mixed_asks(count: int) -> list[dict]:
    """Chat requests with every sampling setting varied: greedy, seeded sampled, penalties, stops, n."""
    settings = [
        {"temperature": 0},
        {"temperature": 1.0, "top_p": 1.0, "seed": 11},
        {"temperature": 0.8, "top_k": 5, "seed": 12, "n": 2},
        {"temperature": 0, "repetition_penalty": 1.4, "stop": ["e"]},
        {"temperature": 1.2, "top_p": 0.9, "min_p": 0.05, "seed": 13},
        {"temperature": 0.7, "top_k": 0, "repetition_penalty": 1.1, "seed": 14, "stop": "ab"},
    ]
    return [
        {
            "messages": [{"role": "user", "content": f"question {i} {'why ' * (i % 4)}"}],
            "max_tokens": 4 + 3 * (i % 20),
        }
        | settings[i % len(settings)]
        for i in range(count)
    ]


def alone(loaded: LoadedModel, ask: dict) -> list[str]:
    """What the library answers for each choice of `ask` on its own (choice i of a seeded ask: seed + i)."""
    prompt = chat_prompt(loaded.tokenizer, [ChatMessage(**m) for m in ask["messages"]])
    names = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
    sampling = replace(
        loaded.config.sampling,
        max_new_tokens=ask["max_tokens"],
        **{k: v for k, v in ask.items() if k in names},
    )
    stop = ask.get("stop", [])
    stops = (*TEMPLATE.stop_strings, *([stop] if isinstance(stop, str) else stop))
    engine = Engine(loaded.model, loaded.tokenizer)
    seed = ask.get("seed")
    return [
        engine.complete(prompt, sampling, stop=stops, seed=None if seed is None else seed + choice).text
        for choice in range(ask.get("n", 1))
    ]


def test_many_concurrent_mixed_requests_each_get_what_they_get_alone(loaded, caplog):
    asks = mixed_asks(30)
    expected = [alone(loaded, ask) for ask in asks]

    async def ask_all(url: str) -> list[list[str]]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as aclient:

            async def ask(index: int, fields: dict) -> list[str]:
                await asyncio.sleep(0.01 * (index % 7))  # arrivals spread over the running batch
                extra = {k: fields.pop(k) for k in ("top_k", "min_p", "repetition_penalty") if k in fields}
                fields["extra_body"] = extra
                if index % 2:
                    answer = await aclient.chat.completions.create(model=MODEL, **fields)
                    return [c.message.content for c in answer.choices]
                stream = await aclient.chat.completions.create(model=MODEL, stream=True, **fields)
                texts = [""] * fields.get("n", 1)
                async for chunk in stream:
                    for choice in chunk.choices:
                        texts[choice.index] += choice.delta.content or ""
                return texts

            return await asyncio.gather(*(ask(i, dict(fields)) for i, fields in enumerate(asks)))

    with (
        caplog.at_level(logging.DEBUG, logger="tinylm.server"),
        running(create_app(loaded, max_batch_size=6)) as url,
    ):
        together = asyncio.run(ask_all(url))
    assert together == expected
    sizes = [int(m) for m in re.findall(r"batch of (\d+) rows", caplog.text)]
    assert max(sizes) == 6  # the batch filled up, and requests joined it while it ran


def batch_state(url: str) -> dict:
    return httpx.get(f"{url}/health").json()["batches"][MODEL]


def wait_for_batch(url: str, **state: int) -> None:
    deadline = time.monotonic() + 30
    while {k: batch_state(url)[k] for k in state} != state:
        assert time.monotonic() < deadline, f"the batch is {batch_state(url)}, not {state}"
        time.sleep(0.01)


def assert_answers_as_alone(url: str, loaded: LoadedModel) -> None:
    """The server still answers a greedy question exactly as the library does."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    assert (
        answer.choices[0].message.content
        == reference(loaded, chat_ids(loaded, "hi"), 20, temperature=0.0).text
    )


def test_clients_that_leave_at_random_leave_no_rows_behind(loaded):
    async def hundred_streams(url: str) -> None:
        rng = random.Random(0)
        async with httpx.AsyncClient(
            base_url=url, timeout=60, limits=httpx.Limits(max_connections=100)
        ) as http:

            async def one(index: int) -> None:
                body = {"model": MODEL, "messages": QUESTION, "max_tokens": 100, "stream": True}
                body |= {"temperature": 0} if index % 2 else {"temperature": 1.0, "seed": index}
                leave_after = rng.choice([0, 1, 3, 10, None])
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    lines = 0
                    async for _ in response.aiter_lines():
                        lines += 1
                        if leave_after is not None and lines > leave_after:
                            break

            await asyncio.gather(*(one(i) for i in range(100)))

    with running(create_app(loaded, max_batch_size=16)) as url:
        asyncio.run(hundred_streams(url))
        wait_for_batch(url, running=0, waiting=0)
        assert_answers_as_alone(url, loaded)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 90}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 120}),
    ],
)
def test_a_whole_answer_stops_at_once_when_its_client_leaves(loaded, monkeypatch, path, body):
    passes = slow_forward_passes(loaded, monkeypatch, seconds=0.02)
    with running(create_app(loaded)) as url:
        # A raw connection, closed without reading once the request's row is in the batch.
        host, port = url.removeprefix("http://").split(":")
        payload = json.dumps({"model": MODEL, "temperature": 0, **body}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            wait_for_batch(url, running=1)
            left = len(passes)
        wait_for_batch(url, running=0, waiting=0)
        assert len(passes) - left < body["max_tokens"] // 4  # it left within a few steps, far from its end
        assert_answers_as_alone(url, loaded)


def test_whole_answers_whose_clients_leave_at_random_free_their_rows(loaded, monkeypatch):
    rng = random.Random(0)
    leaving = set(rng.sample(range(20), 10))
    staying = {i: ask | {"max_tokens": 4 + i % 8} for i, ask in enumerate(mixed_asks(20)) if i not in leaving}
    expected = {i: alone(loaded, ask) for i, ask in staying.items()}
    delays = {i: rng.uniform(0.05, 0.4) for i in sorted(leaving)}  # each leaving client's patience
    longest = 90  # a leaving request would run this many steps to its end
    passes = slow_forward_passes(loaded, monkeypatch, seconds=0.02)

    async def ask_all(url: str) -> dict[int, list[str]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def leave(index: int) -> None:
                path, body = (
                    ("/v1/chat/completions", {"messages": QUESTION})
                    if index % 2
                    else ("/v1/completions", {"prompt": f"text {index}"})
                )
                body |= {"model": MODEL, "max_tokens": longest, "temperature": 1.0, "seed": index}
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(http.post(path, json=body), timeout=delays[index])
                    raise AssertionError(f"request {index} was answered before its client left")

            async def stay(index: int) -> list[str]:
                answer = await http.post("/v1/chat/completions", json={"model": MODEL, **staying[index]})
                return [choice["message"]["content"] for choice in answer.json()["choices"]]

            asked = [leave(i) if i in leaving else stay(i) for i in range(20)]
            answers = await asyncio.gather(*asked)
            return {i: answer for i, answer in enumerate(answers) if i in staying}

    with running(create_app(loaded)) as url:
        assert asyncio.run(ask_all(url)) == expected
        wait_for_batch(url, running=0, waiting=0)
        assert len(passes) < longest  # the leaving requests never ran to their end
        assert_answers_as_alone(url, loaded)


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_memory_stays_flat_over_a_thousand_sequential_requests(loaded):
    with running(create_app(loaded)) as url, httpx.Client(base_url=url, timeout=30) as http:

        def ask(index: int) -> None:
            if index % 10:
                body = {"model": MODEL, "prompt": f"text {index}", "max_tokens": 2, "logprobs": 1}
                assert http.post("/v1/completions", json=body).status_code == 200
            else:
                body = {"model": MODEL, "messages": QUESTION, "max_tokens": 3, "stream": True}
                assert "[DONE]" in http.post("/v1/chat/completions", json=body).text

        for index in range(100):  # warm up: allocator pools, first-call caches
            ask(index)
        before = rss_mib()
        for index in range(1000):
            ask(index)
        grown = rss_mib() - before
    assert grown < 20, f"resident memory grew {grown:.1f} MiB over 1,000 requests"


# -- log-probabilities, tokenize, refusals ------------------------------------------------------------


def test_chat_logprobs_are_the_models_own_whole_and_streamed(client, loaded):
    answer = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == answer.choices[0].message.content
    prompt = chat_ids(loaded, "hi")
    tokens = loaded.tokenizer.encode(answer.choices[0].message.content)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for position, (entry, token) in enumerate(zip(content, tokens, strict=True)):
        assert entry.logprob == pytest.approx(float(expected[position, token]), abs=1e-4)
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy
    _, chunks = streamed_chat(
        client, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_echo_scores_the_prompt_as_lm_evaluation_harness_asks(client, loaded):
    prompt = "the cat sat"
    ids = loaded.tokenizer.encode(prompt)
    scored = Engine(loaded.model, loaded.tokenizer).prompt_logprobs(ids, top=1)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = answer.choices[0]
    assert choice.text == prompt and answer.usage.completion_tokens == 0
    assert choice.logprobs.tokens == list(prompt) and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in scored[1:]])
    assert choice.logprobs.text_offset == list(range(len(prompt)))
    assert all(
        max(top.values()) >= lp
        for top, lp in zip(choice.logprobs.top_logprobs[1:], choice.logprobs.token_logprobs[1:], strict=True)
    )
    # lm-evaluation-harness's shape: token ids, echo, one generated token whose entry comes last.
    raw = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    logprobs = raw.choices[0].logprobs
    assert raw.choices[0].text.startswith(prompt) and len(logprobs.token_logprobs) == len(ids) + 1
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx([e.logprob for e in scored[1:]])
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=5, logprobs=2, temperature=0, stream=True
        )
    )
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == "".join(c.choices[0].text for c in streamed) and len(tokens) == 5


def test_models_state_their_context_window(client):
    entry = client.models.retrieve(MODEL).model_dump()
    assert entry["max_model_len"] == entry["context_length"] == WINDOW


def test_tokenize_and_detokenize_as_llama_cpp_names_them(base_url, loaded):
    tokens = httpx.post(f"{base_url}/tokenize", json={"content": "héllo"}).json()["tokens"]
    assert tokens == loaded.tokenizer.encode("héllo")
    assert httpx.post(f"{base_url}/detokenize", json={"tokens": tokens}).json()["content"] == "héllo"
    pieces = httpx.post(f"{base_url}/tokenize", json={"content": "ab", "with_pieces": True}).json()
    assert pieces == {"tokens": [{"id": 97, "piece": "a"}, {"id": 98, "piece": "b"}]}
    special = httpx.post(f"{base_url}/tokenize", json={"content": "a", "add_special": True}).json()
    assert special["tokens"] == [loaded.tokenizer.eos_id, 97]
    bad = httpx.post(f"{base_url}/detokenize", json={"tokens": [1, 999]})
    assert bad.status_code == 400 and error_of(bad)["param"] == "tokens"
    assert httpx.post(f"{base_url}/tokenize", json={}).status_code == 400


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
def test_json_endpoints_refuse_other_content_types(base_url, path):
    # A page in the user's browser may post text/plain anywhere without asking first.
    response = httpx.post(
        f"{base_url}{path}", content=b'{"model": "run"}', headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415 and "application/json" in error_of(response)["message"]


def test_docs_pages_are_off_and_load_nothing(loaded):
    for key in (None, "secret"):
        with running(create_app(loaded, api_key=key)) as url:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert httpx.get(f"{url}{path}").status_code == 404


def test_a_temperature_that_underflows_is_greedy_over_the_api(client):
    tiny = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1e-40)
    greedy = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


# -- lm-evaluation-harness through the API ---------------------------------------------------------------

MC_QUESTIONS = [
    ("the sky is", ["blue", "green", "loud"], 0),
    ("two and two make", ["four", "five"], 0),
    ("a cat says", ["woof", "meow", "moo"], 1),
    ("ice is", ["hot", "cold"], 1),
    ("the sun rises in the", ["west", "east", "north", "south"], 1),
    ("fish live in", ["trees", "water"], 1),
]
MC_TASK = """task: tinylm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def own_accuracy(model, tokenizer) -> float:
    """The task's accuracy from tinylm's own log-probabilities: the likeliest continuation " choice"."""
    right = 0
    for question, choices, answer in MC_QUESTIONS:
        scores = []
        for choice in choices:
            context, whole = tokenizer.encode(question), tokenizer.encode(f"{question} {choice}")
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        right += max(range(len(choices)), key=lambda i: (scores[i], -i)) == answer
    return right / len(MC_QUESTIONS)


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every connection lm-eval tries beyond this machine is refused and noted."""
    tried: list = []
    connect = socket.socket.connect

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not ipaddress.ip_address(host).is_loopback:
            tried.append(address)
            raise OSError(f"tests are offline: refused {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    return tried


def test_lm_evaluation_harness_scores_a_served_model(loaded, tmp_path, no_network):
    pytest.importorskip("lm_eval")
    data = tmp_path / "questions.jsonl"
    data.write_text(
        "".join(
            json.dumps(dict(zip(("question", "choices", "answer"), q, strict=True))) + "\n"
            for q in MC_QUESTIONS
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tinylm_mc.yaml").write_text(MC_TASK.format(data=data))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with running(create_app(loaded)) as url:
        results = simple_evaluate(
            model="local-completions",
            model_args={
                "model": "run",
                "base_url": f"{url}/v1/completions",
                "tokenizer_backend": "remote",
                "max_length": 128,
                "num_concurrent": 2,
            },
            tasks=["tinylm_mc"],
            task_manager=TaskManager(include_path=str(tasks)),
            num_fewshot=0,
        )
    accuracy = results["results"]["tinylm_mc"]["acc,none"]
    assert accuracy == pytest.approx(own_accuracy(loaded.model, loaded.tokenizer))
    assert no_network == []
