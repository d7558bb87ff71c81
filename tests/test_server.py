"""The OpenAI-compatible API, driven by the official `openai` client against uvicorn on a free local port."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import re
import signal
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
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok", "models": [MODEL]}


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
            b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "logprobs": true}',
            "logprobs",
            "not supported",
        ),
    ],
)
def test_malformed_requests_are_400_in_openai_shape(base_url, body, param, words):
    response = httpx.post(f"{base_url}/v1/chat/completions", content=body, timeout=30)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and words in error["message"]
    if param is not None:
        assert error["param"] == param


def test_malformed_completion_fields_are_400(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3)
    assert raised.value.body["param"].startswith("prompt")


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
    big = httpx.post(f"{base_url}/v1/completions", content=b" " * (2 << 20), timeout=30)
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


def test_generation_stops_promptly_for_a_client_that_leaves_mid_stream(loaded, monkeypatch):
    # Generation runs the model through hidden_states (it applies the output layer to the last position itself).
    hidden_states = loaded.model.hidden_states
    steps: list[float] = []  # when each forward pass began
    step_s, max_tokens = 0.05, 80  # the whole answer would take 4 s

    def slow_step(*args, **kwargs):
        steps.append(time.monotonic())
        time.sleep(step_s)
        return hidden_states(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "hidden_states", slow_step)
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
