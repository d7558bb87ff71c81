"""How long the tokenized-data cache takes to build and to reuse, for the v2 Dolly-sized workload.

A Dolly-sized file (15,000 records from the synthetic generator) is tokenized with the GPT-2 tokenizer as the
v2 preset does it (10,000 training and 1,000 validation records). It prints a table:

- prepare (build): `prepare_data` with an empty cache: read, split, tokenize, write the memory-mapped arrays;
- prepare (reuse): `prepare_data` again: fingerprint the file, open the arrays;
- ready to train (build / reuse): a fresh `tinylm train` process, from its start to its plan line, printed
  when the data and the model are ready and training begins (Python and torch start-up included).

    TINYLM_GPT2_TIKTOKEN=../shared/data/gpt2.tiktoken python benchmarks/data_cache.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

DOLLY_SIZE = 15_000


def write_records(path: Path, n: int) -> None:
    from tinylm.data.synthetic import synthetic_records

    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(n, seed=0)))


def time_prepare(config) -> float:
    from tinylm.data.prepare import prepare_data

    started = time.perf_counter()
    prepare_data(config)
    return time.perf_counter() - started


def time_to_train(data: Path, out: Path) -> float:
    """Seconds from starting `tinylm train` to its plan line (data and model ready, training begins)."""
    command = [sys.executable, "-m", "tinylm", "train", "--quiet", "--preset", "v2", "--data", str(data)]
    command += ["--out", str(out), "--device", "cpu"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            if line.startswith("plan: "):
                return time.perf_counter() - started
        raise RuntimeError(f"tinylm train ended before training (exit {process.wait()})")
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="reuse timings to take the median of")
    args = parser.parse_args()
    if not os.environ.get("TINYLM_GPT2_TIKTOKEN"):
        sys.exit("set TINYLM_GPT2_TIKTOKEN to a gpt2.tiktoken ranks file (e.g. ../shared/data/gpt2.tiktoken)")

    from tinylm.config import preset

    with tempfile.TemporaryDirectory(prefix="tinylm-cache-bench-") as tmp:
        tmp_path = Path(tmp)
        os.environ["TINYLM_CACHE"] = str(tmp_path / "cache")
        data = tmp_path / "dolly-sized.jsonl"
        write_records(data, DOLLY_SIZE)
        v2 = preset("v2")
        config = replace(v2, data=replace(v2.data, source=str(data)))
        rows = [("prepare (build)", time_prepare(config))]
        reuse = [time_prepare(config) for _ in range(args.repeats)]
        rows.append((f"prepare (reuse, median of {args.repeats})", statistics.median(reuse)))
        os.environ["TINYLM_CACHE"] = str(tmp_path / "cold")
        rows.append(("ready to train, fresh process (build)", time_to_train(data, tmp_path / "run1")))
        warm = [time_to_train(data, tmp_path / f"run{i + 2}") for i in range(args.repeats)]
        rows.append(
            (f"ready to train, fresh process (reuse, median of {args.repeats})", statistics.median(warm))
        )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"v2 preset, {DOLLY_SIZE:,} synthetic records, GPT-2 tokenizer; load average {load:.2f}")
    print(f"| {'what':<55} | {'seconds':>8} |")
    print(f"| {'-' * 55} | {'-' * 8}:|")
    for name, seconds in rows:
        print(f"| {name:<55} | {seconds:>8.2f} |")


if __name__ == "__main__":
    main()
