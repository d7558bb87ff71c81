"""Load on `tinylm serve`: continuous batching against the static batcher it replaced, in one run.

Starts two servers on free 127.0.0.1 ports, one after the other, on the same random-init model of the v1 size
(13.5M parameters, GPT-2 vocabulary, CPU):

- "continuous": this checkout's `tinylm serve` (a live batch that requests join between tokens);
- "static": `tinylm serve` from the commit before continuous batching (`--static-ref`, default 84dcba5),
  whose `tinylm/` is extracted with `git archive` into a temporary folder and run from there: a batch ran
  to its end while new requests waited, and only requests that sampled alike were batched together.

Each is driven by closed-loop clients (each sends a request, reads the whole streamed answer, sends the
next) and by open-loop Poisson arrivals at fixed rates, for a bounded time each. Requests mix answer
lengths (max_tokens 8 to 100; a random model rarely ends early) and sampling settings (greedy, sampled
with top-k/top-p, seeded, with a repetition penalty), drawn from one seeded generator so both servers get
the same sequence. Latency is from sending a request to its last event; TTFT (time to first token) is to
its first text. Only loopback addresses are used.

    python benchmarks/serve_load.py                              # clients 1 4 16 64, rates 4 16; 15 s each
    python benchmarks/serve_load.py --seconds 5 --clients 16 --rates
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
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
SAMPLINGS = [
    {"temperature": 0},
    {"temperature": 0.8, "top_k": 50, "top_p": 0.9},
    {"temperature": 1.0, "top_p": 0.95, "seed": 1},
    {"temperature": 0.7, "repetition_penalty": 1.2},
]


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


def extract(ref: str, folder: Path) -> Path:
    """The `tinylm` package as it was at commit `ref`, in `folder`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "tinylm"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def start_server(checkpoint: Path, code: Path, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "tinylm", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    command += ["--max-batch-size", str(max_batch_size), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server outlives this function; its output, for errors)
    process = subprocess.Popen(command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    log.seek(0)
    sys.stderr.write(log.read()[-2000:].decode(errors="replace"))
    raise SystemExit(f"the server did not come up at {url} (exit {process.poll()})")


@dataclass
class Result:
    latency: float
    ttft: float
    tokens: int


def request_body(rng: random.Random, index: int) -> dict:
    return {
        "model": "v1",
        "messages": [{"role": "user", "content": f"Question {index}: what is a cat?"}],
        "max_tokens": rng.randint(8, 100),
        "stream": True,
        "stream_options": {"include_usage": True},
        **rng.choice(SAMPLINGS),
    }


async def one_request(client: httpx.AsyncClient, body: dict) -> Result:
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
    return Result(latency, first if first is not None else latency, tokens)


async def closed_loop(url: str, clients: int, seconds: float) -> tuple[list[Result], float]:
    """Each client asks again as soon as its answer ends, until `seconds` have passed."""
    results: list[Result] = []
    rng = random.Random(clients)
    async with httpx.AsyncClient(
        base_url=url, limits=httpx.Limits(max_connections=clients + 1), timeout=300
    ) as http:
        await one_request(http, request_body(random.Random(0), 0))  # warm up
        started = time.perf_counter()
        deadline = started + seconds

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                results.append(await one_request(http, request_body(rng, len(results))))

        await asyncio.gather(*(client_loop() for _ in range(clients)))
        return results, time.perf_counter() - started


async def open_loop(url: str, rate: float, seconds: float) -> tuple[list[Result], float]:
    """Requests arrive as a Poisson process of `rate` per second for `seconds`, whatever the answers do."""
    rng = random.Random(int(rate * 1000))
    async with httpx.AsyncClient(
        base_url=url, limits=httpx.Limits(max_connections=1000), timeout=300
    ) as http:
        await one_request(http, request_body(random.Random(0), 0))
        started = time.perf_counter()
        tasks = []
        at = rng.expovariate(rate)
        while at < seconds:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(http, request_body(rng, len(tasks)))))
            at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summary(results: list[Result], elapsed: float) -> dict[str, float]:
    return {
        "requests": len(results),
        "requests_per_s": len(results) / elapsed,
        "tokens_per_s": sum(r.tokens for r in results) / elapsed,
        "p50": statistics.median(r.latency for r in results),
        "p99": percentile([r.latency for r in results], 0.99),
        "ttft_p50": statistics.median(r.ttft for r in results),
        "ttft_p99": percentile([r.ttft for r in results], 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--rates", type=float, nargs="*", default=[4.0, 16.0], help="open-loop requests/s")
    parser.add_argument("--seconds", type=float, default=15.0, help="per row (default 15)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--static-ref", default="84dcba5", help="the commit whose static batcher to compare")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        servers = {"static": extract(args.static_ref, Path(folder) / "static"), "continuous": REPO}
        # Written by the older code, which newer code reads (the reverse need not hold).
        checkpoint = Path(folder) / "v1"
        write = f"import sys; sys.path.insert(1, {str(Path(__file__).parent)!r}); import serve_load; "
        write += f"serve_load.make_checkpoint(serve_load.Path({folder!r}))"
        env = {**os.environ, "PYTHONPATH": str(servers["static"])}
        subprocess.run([sys.executable, "-c", write], check=True, env=env, cwd=servers["static"])
        for name, code in servers.items():
            process, url = start_server(checkpoint, code, args.max_batch_size)
            try:
                loads = [("closed", c) for c in args.clients] + [("open", r) for r in args.rates]
                for kind, amount in loads:
                    run = (
                        closed_loop(url, int(amount), args.seconds)
                        if kind == "closed"
                        else open_loop(url, amount, args.seconds)
                    )
                    result = summary(*asyncio.run(run))
                    label = f"{int(amount)} clients" if kind == "closed" else f"{amount:g} req/s Poisson"
                    rows.append((name, label, result))
                    print(f"  {name}, {label}: {result['requests']} requests", flush=True)
            finally:
                process.terminate()
                process.wait(timeout=60)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(
        f"\nv1-sized random-init model, max_tokens 8-100, mixed sampling, max batch {args.max_batch_size}, "
        f"{args.seconds:g} s per row\n"
    )
    print("| server | load | requests/s | tokens/s | p50 latency | p99 latency | p50 TTFT | p99 TTFT |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label, r in rows:
        print(
            f"| {name} | {label} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['p50']:.2f} s | "
            f"{r['p99']:.2f} s | {r['ttft_p50']:.2f} s | {r['ttft_p99']:.2f} s |"
        )


if __name__ == "__main__":
    main()
