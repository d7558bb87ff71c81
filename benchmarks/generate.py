"""Decoding speed of tinylm against Hugging Face transformers' GPT-2 `generate`, side by side in one run.

For the v1 and v2 shapes (random weights: speed does not depend on what the weights say), both libraries
greedily generate 100 new tokens after a 16-token prompt, at batch 1 and batch 8, with their KV caches.
Hugging Face gets a GPT2LMHeadModel of the same size (width, depth, heads, feed-forward width, 50,257-token
vocabulary, 128 positions) and `min_new_tokens` so it never stops early. Rounds alternate between the two
libraries so that load from other processes hits both alike; the table shows medians of new tokens per
second (prefill included) and the ratio tinylm / Hugging Face, also by CPU time: on a machine shared with
other work, a process's CPU seconds vary less than its wall-clock seconds (with one thread, --threads 1,
they measure the same work).

    python benchmarks/generate.py                  # the full table (a few minutes on 2 CPU cores)
    python benchmarks/generate.py --rounds 3 --presets v1 --batches 1 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from tinylm.config import ModelConfig, SamplingConfig, preset
from tinylm.generate import Engine
from tinylm.model import TinyLM
from tinylm.tokenizer import ByteTokenizer

PROMPT_TOKENS = 16
NEW_TOKENS = 100


def tinylm_runner(config: ModelConfig, prompts: torch.Tensor) -> Callable[[], int]:
    engine = Engine(TinyLM(config).eval(), ByteTokenizer())  # token ids only: the tokenizer is never asked
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)
    rows = prompts.tolist()

    def run() -> int:
        return sum(int(t.numel()) for t in engine.generate_ids(rows, greedy))

    return run


def hf_runner(config: ModelConfig, prompts: torch.Tensor) -> Callable[[], int]:
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_seq_length,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_ff,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(hf_config).eval()
    mask = torch.ones_like(prompts)

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(
                prompts,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                use_cache=True,
            )
        return int(out[:, prompts.size(1) :].numel())

    return run


def tokens_per_sec(run: Callable[[], int]) -> tuple[float, float]:
    """New tokens per wall-clock second and per CPU second of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    produced = run()
    return produced / (time.perf_counter() - wall), produced / (time.process_time() - cpu)


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, load {load}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per cell (default 5)")
    parser.add_argument("--presets", nargs="+", default=["v1", "v2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, help="torch threads for both libraries (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    print(machine())
    print(
        f"greedy, {NEW_TOKENS} new tokens after a {PROMPT_TOKENS}-token prompt; median of {args.rounds} rounds"
    )
    print()
    print(
        "| model | batch | tinylm tokens/s | HF generate tokens/s | tinylm / HF | tinylm / HF by CPU time |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.presets:
        config = preset(name).model
        for batch in args.batches:
            torch.manual_seed(0)
            prompts = torch.randint(0, config.vocab_size, (batch, PROMPT_TOKENS))
            runners = {"tinylm": tinylm_runner(config, prompts), "hf": hf_runner(config, prompts)}
            speeds: dict[str, list[tuple[float, float]]] = {key: [] for key in runners}
            for run in runners.values():
                run()  # warm-up: first-call allocations and kernel selection
            for _ in range(args.rounds):
                for key, run in runners.items():
                    speeds[key].append(tokens_per_sec(run))
            ours, theirs = (
                [statistics.median(column) for column in zip(*speeds[key], strict=True)] for key in runners
            )
            print(
                f"| {name} | {batch} | {ours[0]:,.0f} | {theirs[0]:,.0f} | {ours[0] / theirs[0]:.2f}x "
                f"| {ours[1] / theirs[1]:.2f}x |",
                flush=True,
            )
    print()
    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
