"""Load on `tinylm serve`: N concurrent streaming chat clients for a fixed time, with and without batching.

Starts the server itself (`python -m tinylm serve` on a free 127.0.0.1 port) on a random-init model of the
v1 size (13.5M parameters, GPT-2 vocabulary; greedy answers of exactly --max-tokens tokens, since such a
model does not end its answers), and prints one table row per (batching, clients):

    python benchmarks/serve_load.py                 # N = 1, 4, 16; 15 s each; batching off and on
    python benchmarks/serve_load.py --seconds 5 --clients 1 16 --batch-sizes 16

Each client sends a request, reads the whole streamed answer, and sends the next, until the time is up.
Latency is from sending a request to its last event; "first token" is to its first text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch

from tinylm.checkpoint import save_checkpoint
from tinylm.config import preset
from tinylm.model import TinyLM
from tinylm.server import listen
from tinylm.tokenizer import GPT2_RANKS_ENV, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_RANKS = REPO.parent / "shared" / "data" / "gpt2.tiktoken"


def make_checkpoint(folder: Path) -> Path:
    """A random-init v1 model, saved as a run folder named "v1"."""
    config = preset("v1")
    config = replace(config, model=replace(config.model, dropout=0.0))
    ranks = os.environ.get(GPT2_RANKS_ENV) or (str(SHARED_RANKS) if SHARED_RANKS.is_file() else None)
    tokenizer = build_tokenizer("gpt2", gpt2_ranks_path=ranks)
    torch.manual_seed(0)
    run = folder / "v1"
    save_checkpoint(
        run / "best_model.pt", model=TinyLM(config.model), config=config, tokenizer=tokenizer, step=0
    )
    return run


def start_server(checkpoint: Path, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "tinylm", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    command += ["--max-batch-size", str(max_batch_size), "--device", "cpu"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not come up at {url}")


async def one_request(client: httpx.AsyncClient, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first text, completion tokens) of one streamed chat answer."""
    body = {
        "model": "v1",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: ") :])
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - started
    return latency, first if first is not None else latency, tokens


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict[str, float]:
    """Closed-loop load: each client asks again as soon as its answer ends, until `seconds` have passed."""
    results: list[tuple[float, float, int]] = []
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        await one_request(http, "warm up", max_tokens)
        started = time.perf_counter()
        deadline = started + seconds

        async def client_loop(index: int) -> None:
            asked = 0
            while time.perf_counter() < deadline:
                results.append(
                    await one_request(http, f"Question {index}.{asked}: what is a cat?", max_tokens)
                )
                asked += 1

        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {
        "requests": len(results),
        "requests_per_s": len(results) / elapsed,
        "tokens_per_s": sum(r[2] for r in results) / elapsed,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "first_p50": statistics.median(r[1] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15.0, help="per row (default 15)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 16], help="server --max-batch-size values (1: off)"
    )
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = make_checkpoint(Path(folder))
        for batch_size in args.batch_sizes:
            process, url = start_server(checkpoint, batch_size)
            try:
                for clients in args.clients:
                    result = asyncio.run(load(url, clients, args.seconds, args.max_tokens))
                    rows.append((batch_size, clients, result))
                    print(
                        f"  max batch {batch_size}, {clients} clients: {result['requests']} requests",
                        flush=True,
                    )
            finally:
                process.terminate()
                process.wait(timeout=60)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(
        f"\nv1-sized random-init model, {args.max_tokens} new tokens per answer, {args.seconds:g} s per row\n"
    )
    print("| max batch | clients | requests/s | tokens/s | p50 latency | p99 latency | p50 first token |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch_size, clients, r in rows:
        print(
            f"| {batch_size} | {clients} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['p50']:.2f} s | {r['p99']:.2f} s | {r['first_p50']:.2f} s |"
        )


if __name__ == "__main__":
    main()
