"""The training-throughput benchmark measures what `tinylm train` runs: each timed pass trains the step whose
tokens it counts, with the run's own schedule (the benchmark once advanced the step twice per pass)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tinylm.train import build_training, train

TINY = {"d_model": 32, "n_heads": 2, "n_layers": 2, "d_ff": 64, "max_seq_length": 64, "dropout": 0.1}


def load_benchmark(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    return load_benchmark("train_throughput")


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def test_a_benchmark_pass_trains_and_counts_the_same_step(throughput, gpt2_ranks, tmp_path):
    row = throughput.Row("tinylm default", overrides={**TINY, "eval_interval": 1000, "log_interval": 1})
    spec = {
        **row.__dict__,
        "data": "synthetic",
        "dataset_size": 64,
        "scratch": str(tmp_path),
        "nanogpt": None,
        "dropout_seed": None,
        "preset": "v1",
        "warmup": 1,
        "steps": 4,
    }
    measured = throughput.run_tinylm(spec)
    config = throughput.tinylm_config(spec)

    train(config, out_dir=tmp_path / "run", progress_bar=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert measured.losses == [m["loss"] for m in lines if "loss" in m]  # steps 1..5, the run's own

    run = build_training(config, device=torch.device("cpu"))
    timed = [run.batches(step) for step in range(spec["warmup"], spec["warmup"] + spec["steps"])]
    assert measured.tokens == sum(b.n_tokens for batches in timed for b in batches)
    assert measured.useful == sum(b.n_targets for batches in timed for b in batches)
    assert len(measured.seconds) == spec["steps"]


def test_a_quick_quality_pass_writes_its_table_curves_and_plot(quality, tmp_path):
    text = tmp_path / "shakespeare.txt"
    text.write_text(quality.SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    tiny = ",".join(f"model.{k}={v}" for k, v in TINY.items() if k not in ("max_seq_length", "dropout"))
    out = tmp_path / "out"
    quality.main(
        [
            *("--quick", "--shape", "char", "--seeds", "1", "--text", str(text), "--out", str(out)),
            *("--recipe", f"tiny={tiny}", "--recipes", "tiny"),
        ]
    )
    assert "| tinylm tiny | 1 |" in (out / "quality.md").read_text()
    (run,) = json.loads((out / "quality.json").read_text())["shapes"]["char"]["rows"]["tinylm tiny"]["runs"]
    losses = run["curve"]["val_losses"]
    assert run["curve"]["steps"] == [0, 2, 4]
    assert all(math.isfinite(loss) for loss in [*losses, run["final_val_loss"]])
    assert losses[-1] < losses[0]
    assert (out / "quality.png").read_bytes().startswith(b"\x89PNG")


def test_nanogpt_output_gives_its_curve_without_evaluation_time(quality):
    """Lines in the formats of nanoGPT's train.py, each with the time it was read: the step after an
    evaluation is timed from the "step" line, or at the median step time when a checkpoint was saved."""
    lines = [
        (9.0, "tokens per iteration will be: 768"),
        (10.0, "step 0: train loss 4.2000, val loss 4.1900"),
        (10.5, "iter 0: loss 4.1800, time 2500.00ms, mfu -100.00%"),
        (10.6, "iter 1: loss 3.9000, time 100.00ms, mfu -100.00%"),
        (11.0, "step 2: train loss 3.8000, val loss 3.8500"),
        (11.1, "saving checkpoint to out"),
        (12.0, "iter 2: loss 3.7000, time 1000.00ms, mfu -100.00%"),
        (12.3, "iter 3: loss 3.6000, time 300.00ms, mfu -100.00%"),
        (13.0, "step 4: train loss 3.5000, val loss 3.5500"),
        (13.1, "saving checkpoint to out"),
        (13.5, "iter 4: loss 3.4000, time 500.00ms, mfu 0.01%"),  # after the last evaluation: not counted
    ]
    curve = quality.nanogpt_curve(lines)
    assert curve.steps == [0, 2, 4]
    assert curve.seconds == pytest.approx([0.0, 0.5 + 0.1, 0.6 + 0.3 + 0.3])
    assert curve.val_losses == [4.19, 3.85, 3.55]
    assert curve.train_losses == [4.18, 3.9, 3.7, 3.6]
