"""Where a training step's time goes: tinylm's own `train_step`, split into its phases by hooks.

The run is built and stepped exactly as `benchmarks/train_throughput.py` does (the same data, config and
`train_step`); hooks on the model and the optimizer timestamp the phase boundaries without changing what
runs:

- trunk forward: embeddings and blocks, up to the final norm's output;
- output layer + loss: the chunked 50,257-wide product, softmax and their gradients (`linear_cross_entropy`
  takes its gradients in its forward pass, so its backward only scales them);
- trunk backward: from the final norm's gradient to the embedding's;
- clip: `.item()` of the loss, the non-finite check and gradient clipping;
- optimizer: AdamW's step and zero_grad.

Each phase's matrix FLOPs are counted as the throughput benchmark counts them, and shown as GFLOP/s and as a
share of this machine's float32 matmul peak (measured here).

    python benchmarks/step_breakdown.py                  # v2, both data kinds
    python benchmarks/step_breakdown.py --data text --steps 10
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from train_throughput import (
    DATA_KINDS,
    SHAKESPEARE,
    load,
    machine,
    matmul_flops,
    matmul_peaks,
    tinylm_config,
    write_data,
)

from tinylm.runtime import keep_freed_memory
from tinylm.train import build_training, train_step

PHASES = ("trunk forward", "output layer + loss", "trunk backward", "clip", "optimizer")


class PhaseClock:
    """Timestamps at the phase boundaries of one `train_step`, taken by hooks on the model and optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.marks: dict[str, float] = {}
        model.embed.register_forward_pre_hook(lambda *_: self._mark("start"))
        model.ln_f.register_forward_hook(self._trunk_done)
        model.embed.weight.register_post_accumulate_grad_hook(lambda _: self._mark("backward done"))
        optimizer.register_step_pre_hook(lambda *_: self._mark("optimizer start"))

    def _mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def _trunk_done(self, module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        self._mark("trunk done")
        if output.requires_grad:
            output.register_hook(lambda grad: self._mark("loss done"))

    def phases(self, end: float) -> list[float]:
        m = self.marks
        points = [m["start"], m["trunk done"], m["loss done"], m["backward done"], m["optimizer start"], end]
        return [b - a for a, b in itertools.pairwise(points)]


def phase_flops(config, batch) -> list[float]:
    """Matrix FLOPs of each phase for one micro-batch: the trunk's forward is a third of its work."""
    m = config.model
    positions, width = batch.inputs.numel(), batch.inputs.size(1)
    trunk = matmul_flops(m, vocab=m.vocab_size, positions=positions, width=width, head_rows=0)
    head = matmul_flops(m, vocab=m.vocab_size, positions=0, width=width, head_rows=batch.n_targets)
    return [trunk / 3, head, 2 * trunk / 3, 0.0, 0.0]


def measure(kind: str, data: str, args: argparse.Namespace, dataset_size: int) -> list[list[float]]:
    spec = {
        "data": data,
        "dataset_size": dataset_size,
        "preset": args.preset,
        "warmup": args.warmup,
        "steps": args.steps,
        "overrides": {},
    }
    config = tinylm_config(spec)
    keep_freed_memory()
    run = build_training(config, device=torch.device("cpu"))
    run.state.model.train()
    if len(run.batches(0)) != 1:
        sys.exit("error: the step has several micro-batches; the phase hooks time one")
    clock = PhaseClock(run.state.model, run.state.optimizer)
    rows = []
    for step in range(args.warmup + args.steps):
        batches = run.batches(step)
        train_step(run.state, batches, run.config.train, dtype=run.dtype)
        times = clock.phases(time.perf_counter())
        if step >= args.warmup:
            rows.append([*times, *phase_flops(run.config, batches[0])])
        print(f"{kind} step {step + 1}: {sum(times) * 1e3:.0f} ms (load {load()})", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="v2")
    parser.add_argument("--data", default=",".join(DATA_KINDS), help="instructions, text or both")
    parser.add_argument("--steps", type=int, default=8, help="measured steps (medians are shown)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    kinds = [k.strip() for k in args.data.split(",")]
    dataset_size = 16 * (args.warmup + args.steps + 1) + 256
    peak = matmul_peaks()["fp32"] / 1e9  # GFLOP/s
    print(f"Machine: {machine()}")
    print(f"float32 matmul peak {peak:.0f} GFLOP/s; {args.preset}, medians of {args.steps} steps")
    print()
    print("| data | phase | ms | share | GFLOP | GFLOP/s | % fp32 peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="tinylm-breakdown-") as tmp:
        paths = {"instructions": str(write_data(Path(tmp), dataset_size + dataset_size // 10 + 8))}
        paths["text"] = str(SHAKESPEARE)
        for kind in kinds:
            rows = measure(kind, paths[kind], args, dataset_size)
            columns = [statistics.median(column) for column in zip(*rows, strict=True)]
            times, flops = columns[: len(PHASES)], columns[len(PHASES) :]
            total = sum(times)
            for phase, seconds, work in zip(PHASES, times, flops, strict=True):
                rate = f"{work / seconds / 1e9:.1f}" if work else ""
                share = f"{100 * work / seconds / 1e9 / peak:.0f}%" if work else ""
                print(
                    f"| {kind} | {phase} | {seconds * 1e3:.0f} | {100 * seconds / total:.0f}% "
                    f"| {work / 1e9:.2f} | {rate} | {share} |"
                )
            print(
                f"| {kind} | **step** | **{total * 1e3:.0f}** | 100% | {sum(flops) / 1e9:.2f} "
                f"| {sum(flops) / total / 1e9:.1f} | {100 * sum(flops) / total / 1e9 / peak:.0f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
