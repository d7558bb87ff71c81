"""The training-throughput benchmark measures what `tinylm train` runs: each timed pass trains the step whose
tokens it counts, with the run's own schedule (the benchmark once advanced the step twice per pass)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tinylm.train import build_training, train

TINY = {"d_model": 32, "n_heads": 2, "n_layers": 2, "d_ff": 64, "max_seq_length": 64, "dropout": 0.1}


@pytest.fixture(scope="module")
def throughput():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
