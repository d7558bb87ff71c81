"""Soak `tinylm serve` with mixed good and bad requests; report errors by kind, latency and the server's RSS.

Starts this checkout's `tinylm serve` on a free 127.0.0.1 port with a random-init v1 model (as
benchmarks/serve_load.py does), then sends a bounded number of requests from a few concurrent clients, for at
most a bounded time: chat and text completions (streamed and not, with log-probabilities), tokenize and
detokenize, and bad ones (malformed JSON, a browser-forgeable text/plain body, wrong types, settings that
underflow, refused options, prompts that do not fit, unknown models, clients that leave mid-stream). Each
kind has the answer a well-behaved server gives; anything else (above all a 500) is counted as unexpected.
The server's resident memory is sampled throughout. Only loopback addresses are used.

    python benchmarks/soak.py                          # 600 requests, 4 clients, at most 180 s
    python benchmarks/soak.py --requests 200 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from serve_load import REPO, make_checkpoint, start_server

MODEL = "v1"
CHAT = "/v1/chat/completions"


async def chat(client: httpx.AsyncClient, **extra: object) -> int:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 24,
    }
    return (await client.post(CHAT, json={**body, **extra})).status_code


async def chat_stream(client: httpx.AsyncClient) -> int:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": 24,
        "stream": True,
    }
    async with client.stream("POST", CHAT, json=body) as response:
        async for _ in response.aiter_lines():
            pass
        return response.status_code


async def leave_mid_stream(client: httpx.AsyncClient) -> int:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Go on."}],
        "max_tokens": 100,
        "stream": True,
    }
    async with client.stream("POST", CHAT, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                break  # the client goes away; the server must free the row
        return response.status_code


async def completion_logprobs(client: httpx.AsyncClient) -> int:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 0, "echo": True, "logprobs": 1}
    return (await client.post("/v1/completions", json=body)).status_code


async def tokenize_round_trip(client: httpx.AsyncClient) -> int:
    ids = (await client.post("/tokenize", json={"content": "hello world"})).json()["tokens"]
    return (await client.post("/detokenize", json={"tokens": ids})).status_code


async def raw(client: httpx.AsyncClient, content: bytes, content_type: str) -> int:
    return (await client.post(CHAT, content=content, headers={"content-type": content_type})).status_code


# kind -> (request, the status a well-behaved server answers), drawn with these weights.
KINDS: dict[str, tuple[Callable[[httpx.AsyncClient], Awaitable[int]], int, int]] = {
    "chat": (chat, 200, 4),
    "chat, streamed": (chat_stream, 200, 4),
    "chat, client leaves mid-stream": (leave_mid_stream, 200, 2),
    "chat, top_logprobs": (lambda c: chat(c, logprobs=True, top_logprobs=3), 200, 1),
    "completion, echo + logprobs": (completion_logprobs, 200, 1),
    "tokenize + detokenize": (tokenize_round_trip, 200, 1),
    "temperature 1e-40 (greedy)": (lambda c: chat(c, temperature=1e-40), 200, 1),
    "repetition_penalty 1e-40": (lambda c: chat(c, repetition_penalty=1e-40), 400, 1),
    "temperature of the wrong type": (lambda c: chat(c, temperature="hot"), 400, 1),
    "tools (refused)": (lambda c: chat(c, tools=[{"type": "function"}]), 400, 1),
    "max_tokens beyond the window": (lambda c: chat(c, max_tokens=10_000), 400, 1),
    "unknown model": (lambda c: chat(c, model="nope"), 404, 1),
    "malformed JSON": (lambda c: raw(c, b'{"model": ', "application/json"), 400, 1),
    "text/plain body": (lambda c: raw(c, json.dumps({"model": MODEL}).encode(), "text/plain"), 415, 1),
}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(url: str, pid: int, *, requests: int, clients: int, seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    names = list(KINDS)
    plan = rng.choices(names, weights=[KINDS[n][2] for n in names], k=requests)
    results: dict[str, list[tuple[int | str, float]]] = defaultdict(list)
    memory: list[tuple[float, float]] = []
    started = time.monotonic()
    deadline = started + seconds
    queue = iter(plan)

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for name in queue:
                if time.monotonic() > deadline:
                    return
                sent = time.monotonic()
                try:
                    status: int | str = await KINDS[name][0](client)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                results[name].append((status, time.monotonic() - sent))

    async def watch_memory() -> None:
        while time.monotonic() < deadline:
            memory.append((time.monotonic() - started, rss_mib(pid)))
            await asyncio.sleep(1.0)

    watcher = asyncio.create_task(watch_memory())
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    watcher.cancel()
    memory.append((time.monotonic() - started, rss_mib(pid)))
    return {"results": results, "memory": memory, "elapsed": time.monotonic() - started}


def report(outcome: dict, args: argparse.Namespace) -> str:
    results, memory = outcome["results"], outcome["memory"]
    total = sum(len(r) for r in results.values())
    lines = [
        f"{total} requests from {args.clients} clients in {outcome['elapsed']:.0f} s (bounds: {args.requests} "
        f"requests, {args.seconds:.0f} s)",
        "",
        "| kind | requests | expected | answers | unexpected | p50 s | p99 s |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, (_, expected, _) in KINDS.items():
        got = results.get(name, [])
        if not got:
            continue
        statuses = Counter(status for status, _ in got)
        latencies = sorted(latency for _, latency in got)
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        unexpected = sum(n for status, n in statuses.items() if status != expected)
        answers = ", ".join(f"{status} x{n}" for status, n in sorted(statuses.items(), key=str))
        lines.append(
            f"| {name} | {len(got)} | {expected} | {answers} | {unexpected} | "
            f"{statistics.median(latencies):.3f} | {p99:.3f} |"
        )
    values = [mib for _, mib in memory]
    third = max(1, len(values) // 3)
    lines += [
        "",
        f"Server RSS (MiB): first {values[0]:.0f}, mean of the first third {statistics.fmean(values[:third]):.0f}, "
        f"of the last third {statistics.fmean(values[-third:]):.0f}, highest {max(values):.0f} "
        f"({len(values)} samples, one a second)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="at most this many requests (default 600)")
    parser.add_argument("--seconds", type=float, default=180, help="and at most this long (default 180)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tinylm-soak-") as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        process, url = start_server(checkpoint, REPO, max_batch_size=16)
        try:
            outcome = asyncio.run(
                soak(
                    url,
                    process.pid,
                    requests=args.requests,
                    clients=args.clients,
                    seconds=args.seconds,
                    seed=args.seed,
                )
            )
            alive = httpx.get(f"{url}/health", timeout=5).json()
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(report(outcome, args))
    print(f"\n/health afterwards: {json.dumps(alive)}")


if __name__ == "__main__":
    main()
