"""Batch-1 decoding speed of one exported model in tinylm, transformers and llama.cpp, side by side in one run.

For each of the v2-gpt2 and v2-llama presets (random weights: speed does not depend on what they say, GPT-2's
50,257-token vocabulary), a tinylm checkpoint is exported with `tinylm export` to a Hugging Face folder and to
f32 and q8_0 GGUF files. Then each runtime greedily decodes 100 new tokens after a 16-token prompt, batch 1,
with its KV cache: tinylm from the exported folder (imported back, as `--checkpoint DIR` does), transformers'
`generate` from the same folder, llama.cpp (llama-cpp-python) from the GGUF files. Rounds alternate between
the runtimes so that load from other processes hits them alike; the table shows medians of new tokens per
second (prefill included). Every runtime uses --threads threads.

    TINYLM_GPT2_TIKTOKEN=../shared/data/gpt2.tiktoken python benchmarks/exported.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from tinylm.checkpoint import load_model, save_checkpoint
from tinylm.config import SamplingConfig, preset
from tinylm.generate import Engine
from tinylm.interchange import model_card, write_gguf, write_hf
from tinylm.model import TinyLM
from tinylm.tokenizer import build_tokenizer

PROMPT_TOKENS = 16
NEW_TOKENS = 100


def tinylm_runner(folder: Path, prompt: list[int]) -> Callable[[], int]:
    loaded = load_model(folder)
    engine = Engine(loaded.model, loaded.tokenizer)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)
    return lambda: sum(int(t.numel()) for t in engine.generate_ids([prompt], greedy))


def hf_runner(folder: Path, prompt: list[int]) -> Callable[[], int]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([prompt])

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
        return int(out[:, ids.size(1) :].numel())

    return run


def llama_cpp_runner(path: Path, prompt: list[int], threads: int) -> Callable[[], int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=PROMPT_TOKENS + NEW_TOKENS, n_threads=threads, verbose=False)

    def run() -> int:
        produced = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            produced += 1
            if produced == NEW_TOKENS:
                break
        return produced

    return run


def tokens_per_sec(run: Callable[[], int]) -> float:
    start = time.perf_counter()
    produced = run()
    return produced / (time.perf_counter() - start)


def exported(name: str, scratch: Path, ranks: str | None) -> tuple[Path, dict[str, Path]]:
    """The preset's random model as a tinylm checkpoint, exported to a Hugging Face folder and GGUF files."""
    config = preset(name)
    tokenizer = build_tokenizer("gpt2", gpt2_ranks_path=ranks)
    torch.manual_seed(0)
    model = TinyLM(config.model).eval()
    checkpoint = save_checkpoint(
        scratch / name / "best_model.pt", model=model, config=config, tokenizer=tokenizer, step=0
    )
    loaded = load_model(checkpoint)
    card = model_card(loaded.config, loaded.tokenizer, info=loaded.info, command="benchmarks/exported.py")
    folder = write_hf(loaded.model, loaded.config, loaded.tokenizer, scratch / f"{name}-hf", card=card)
    files = {
        dtype: write_gguf(loaded.model, loaded.tokenizer, scratch / f"{name}-{dtype}.gguf", dtype=dtype)
        for dtype in ("f32", "q8_0")
    }
    return folder, files


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per runtime (default 5)")
    parser.add_argument("--presets", nargs="+", default=["v2-gpt2", "v2-llama"])
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads for every runtime"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    ranks = os.environ.get("TINYLM_GPT2_TIKTOKEN")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, load {load}")
    print(
        f"batch 1, greedy, {NEW_TOKENS} new tokens after a {PROMPT_TOKENS}-token prompt; median of {args.rounds} rounds"
    )
    print()
    print(
        "| model | tinylm tokens/s | transformers tokens/s | llama.cpp f32 tokens/s | llama.cpp q8_0 tokens/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.presets:
            folder, files = exported(name, Path(scratch), ranks)
            torch.manual_seed(0)
            prompt = torch.randint(0, 50257, (PROMPT_TOKENS,)).tolist()
            runners = {
                "tinylm": tinylm_runner(folder, prompt),
                "transformers": hf_runner(folder, prompt),
                **{f"llama.cpp {d}": llama_cpp_runner(p, prompt, args.threads) for d, p in files.items()},
            }
            for run in runners.values():
                run()  # warm-up: first-call allocations and kernel selection
            speeds: dict[str, list[float]] = {key: [] for key in runners}
            for _ in range(args.rounds):
                for key, run in runners.items():
                    speeds[key].append(tokens_per_sec(run))
            cells = " | ".join(f"{statistics.median(speeds[key]):,.0f}" for key in runners)
            print(f"| {name} | {cells} |", flush=True)
    print()
    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
