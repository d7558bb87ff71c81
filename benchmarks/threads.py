"""How OpenMP threads should wait, measured: each setting on a small and a large training step and on batch-1
decoding, on an idle machine and beside a busy loop that keeps one CPU busy (another program).

Settings: threads that sleep at once (`OMP_WAIT_POLICY=PASSIVE`, tinylm's choice on a busy machine), spin
briefly (`GOMP_SPINCOUNT` as tinylm sets it on an idle machine), OpenMP's own default (spin long, then sleep)
and a single thread. Each measurement is a fresh subprocess, so the setting is read as OpenMP starts; the
table shows milliseconds per step or per token (median of the rounds; lower is better).

    python benchmarks/threads.py               # a few minutes on 2 CPU cores
    python benchmarks/threads.py --rounds 1 --scale 0.2 --workloads "demo train step"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tinylm.threads import SPIN_COUNT, USER_SETTINGS  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SHAKESPEARE, GPT2_RANKS = SHARED / "tinyshakespeare.txt", SHARED / "gpt2.tiktoken"

SETTINGS = {
    "sleep at once (PASSIVE)": {"OMP_WAIT_POLICY": "PASSIVE"},
    f"spin briefly (GOMP_SPINCOUNT={SPIN_COUNT})": {"GOMP_SPINCOUNT": SPIN_COUNT},
    "OpenMP's default": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
# Units timed per measurement, after a warm-up: a v2 step is about a hundred times a demo step.
WORKLOADS = {"demo train step": 30, "v2 train step": 4, "v2 decode token": 100}


def worker(workload: str, steps: int) -> float:
    """Milliseconds per unit of `workload`, after a warm-up."""
    import tempfile

    import torch

    from tinylm.config import SamplingConfig, apply_overrides, preset
    from tinylm.generate import Engine
    from tinylm.model import TinyLM
    from tinylm.tokenizer import ByteTokenizer
    from tinylm.train import build_training, train_step

    if workload == "v2 decode token":
        config = preset("v2").model
        engine = Engine(TinyLM(config).eval(), ByteTokenizer())
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=steps)
        prompt = [list(range(16))]
        list(engine.generate_ids(prompt, SamplingConfig(temperature=0.0, max_new_tokens=8)))
        start = time.perf_counter()
        produced = sum(int(t.numel()) for t in engine.generate_ids(prompt, greedy))
        return (time.perf_counter() - start) * 1000 / produced
    if workload == "demo train step":
        config = apply_overrides(preset("demo"), {"source": "synthetic"})
    else:
        overrides = {"source": str(SHAKESPEARE), "tokenizer": "gpt2", "gpt2_ranks_path": str(GPT2_RANKS)}
        config = apply_overrides(preset("v2"), {**overrides, "dataset_size": 400})
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TINYLM_CACHE"] = cache
        run = build_training(config, device=torch.device("cpu"))
        for step in range(3):
            train_step(run.state, run.batches(step), config.train)
        start = time.perf_counter()
        for step in range(3, 3 + steps):
            train_step(run.state, run.batches(step), config.train)
        return (time.perf_counter() - start) * 1000 / steps


@contextmanager
def busy_loop(on: bool):
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if loop is not None:
            loop.kill()
            loop.wait()


def measure(workload: str, setting: dict[str, str], steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in (*USER_SETTINGS, "OMP_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps([workload, steps])],
        env={**env, **setting, "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"error: {workload} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="times the units timed per measurement")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        workload, steps = json.loads(args.worker)
        print(worker(workload, steps))
        return
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        sys.exit(f"error: --workloads: unknown {unknown} (choose from {', '.join(WORKLOADS)})")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print("| workload | beside | " + " | ".join(SETTINGS) + " |")
    print("| --- | --- |" + " ---: |" * len(SETTINGS))
    for workload in workloads:
        for beside in (False, True):
            with busy_loop(beside):
                times = {
                    name: statistics.median(
                        measure(workload, s, max(1, round(WORKLOADS[workload] * args.scale)))
                        for _ in range(args.rounds)
                    )
                    for name, s in SETTINGS.items()
                }
            cells = " | ".join(f"{t:.1f}" for t in times.values())
            print(f"| {workload} (ms) | {'a busy loop' if beside else 'idle'} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
