"""Training under torchrun: 2 CPU processes (gloo) train the model one process would, write one run folder,
stop and resume together, and a rank that fails brings the job down with its error shown."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinylm import checkpoint as ckpt
from tinylm.cli import main
from tinylm.distributed import World
from tinylm.model import TinyLM

REPO_ROOT = Path(__file__).resolve().parents[1]
# Losses of 2 processes and of 1 differ only in the order of float32 sums (observed: ~1e-7 relative).
TOLERANCE = 1e-5

# 57 examples in steps of 8: each epoch ends with a step of one example, so one rank gets none there.
# Two evaluations of 2 batches of 8 held-out examples: one batch on each rank.
RUN = [
    *("--data", "synthetic", "--quiet", "--set", "dataset_size=57", "--set", "val_fraction=0.3"),
    *("--set", "max_steps=20", "--set", "eval_interval=10", "--set", "save_interval=10"),
    *("--set", "eval_batches=2", "--set", "log_interval=1", "--set", "warmup_steps=3"),
    *("--set", "learning_rate=3e-3", "--set", "epochs=100"),
    # float32: bfloat16 autocast rounds differently for differently shaped micro-batches.
    *("--set", "precision=fp32"),
]
# The step takes 8 examples either way; each process packs its share into micro-batches.
ONE_PROCESS = ["--set", "batch_size=4", "--set", "gradient_accumulation_steps=2"]
TWO_PROCESSES = ["--set", "batch_size=2", "--set", "gradient_accumulation_steps=4"]

# Run under torchrun instead of `-m tinylm`: on rank 1, at step FAULT_STEP, a Ctrl-C (SIGINT to itself
# alone) or an exception; and rank 1 counts the gradient all-reduces DDP makes.
FAULTY_RANK = """
import os, signal, sys
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from tinylm import distributed, train
from tinylm.cli import main

real_wrap, real_step, real_train = distributed.World.wrap, train.train_step, train.train
all_reduces = []

def wrap(self, model, loss):
    ddp = real_wrap(self, model, loss)
    ddp.register_comm_hook(None, lambda state, bucket: all_reduces.append(1) or allreduce_hook(state, bucket))
    return ddp

def train_step(state, *args, **kwargs):
    if os.environ["RANK"] == "1" and state.step == int(os.environ["FAULT_STEP"]):
        if os.environ["FAULT"] == "interrupt":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            raise RuntimeError("rank 1 fails on purpose")
    return real_step(state, *args, **kwargs)

def run(*args, **kwargs):
    result = real_train(*args, **kwargs)
    if os.environ["RANK"] == "1":
        print(f"rank 1: {len(all_reduces)} gradient all-reduces in {result.step} steps", flush=True)
    return result

distributed.World.wrap, train.train_step, train.train = wrap, train_step, run
sys.exit(main())
"""


def torchrun(args, env, log: Path, *, script=("-m", "tinylm")) -> subprocess.CompletedProcess:
    """Two processes on this machine; all output (both ranks' and torchrun's) into `log`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**env, "PYTHONPATH": str(REPO_ROOT)}  # this checkout's tinylm, also for a script elsewhere
    with log.open("w") as out:
        done = subprocess.run(
            [*command, *script, "train", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    done.output = log.read_text()
    return done


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "tokens_per_sec"} for line in lines]


def numbers(lines: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in lines if key in m]


def assert_close(got: list[dict], want: list[dict]) -> None:
    for key in ("loss", "val_loss"):
        assert [s for s, _ in numbers(got, key)] == [s for s, _ in numbers(want, key)]
        assert [v for _, v in numbers(got, key)] == pytest.approx(
            [v for _, v in numbers(want, key)], rel=TOLERANCE
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_set_args, offline_env):
    """The same 20 steps by two processes (under torchrun) and by one (in-process)."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    done = torchrun(
        [*tiny_set_args, *RUN, *TWO_PROCESSES, "--out", str(two)], offline_env, two.parent / "two.log"
    )
    assert done.returncode == 0, done.output
    assert main(["train", *tiny_set_args, *RUN, *ONE_PROCESS, "--out", str(one)]) == 0
    return two, one, done.output


def test_two_processes_compute_the_losses_of_one(runs):
    two, one, _ = runs
    assert len(numbers(metrics(two), "loss")) == 20 and len(numbers(metrics(two), "val_loss")) == 2
    assert_close(metrics(two), metrics(one))


def test_rank_zero_alone_writes_and_reports(runs):
    two, one, output = runs
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [m["step"] for m in metrics(two)] == [m["step"] for m in metrics(one)]  # each line once
    assert output.count("plan:") == 1 and output.count("done at step 20") == 1
    assert "each taking 1/2 of every step's examples" in output


def test_checkpoints_move_between_one_and_two_processes(runs, tmp_path, tiny_set_args, offline_env):
    two, one, _ = runs
    loaded = ckpt.load_model(two)  # a DDP run's checkpoint, for single-process inference
    assert loaded.model.state_dict().keys() == TinyLM(loaded.config.model).state_dict().keys()
    # The DDP run resumed from step 10 by one process, and the single-process run by two.
    assert main(["train", "--resume", str(copy_run(two, tmp_path / "a") / "checkpoint_step_10.pt")]) == 0
    assert_close(metrics(tmp_path / "a"), metrics(two))
    resumed = copy_run(one, tmp_path / "b")
    done = torchrun(["--resume", str(resumed / "checkpoint_step_10.pt")], offline_env, tmp_path / "b.log")
    assert done.returncode == 0, done.output
    assert_close(metrics(resumed), metrics(one))


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_a_ctrl_c_on_one_rank_stops_both_after_the_same_step_and_resume_matches(
    runs, tmp_path, tiny_set_args, offline_env
):
    two, _, _ = runs
    script = tmp_path / "faulty_rank.py"
    script.write_text(FAULTY_RANK)
    env = {**offline_env, "FAULT": "interrupt", "FAULT_STEP": "7"}
    args = [*tiny_set_args, *RUN, *TWO_PROCESSES, "--out", str(tmp_path / "run")]
    stopped = torchrun(args, env, tmp_path / "stop.log", script=[str(script)])
    assert stopped.returncode != 0, stopped.output
    assert ckpt.read_checkpoint(tmp_path / "run" / ckpt.LATEST)[1]["step"] == 8, stopped.output
    # Each rank runs 2 micro-batches a step; the gradients (one bucket) are all-reduced after the 2nd only.
    assert "rank 1: 8 gradient all-reduces in 8 steps" in stopped.output, stopped.output
    done = torchrun(["--resume", str(tmp_path / "run")], offline_env, tmp_path / "resume.log")
    assert done.returncode == 0, done.output
    assert metrics(tmp_path / "run") == metrics(two)  # bit for bit: the same arithmetic on two processes


def test_a_failing_rank_ends_the_job_with_its_error_shown(tmp_path, tiny_set_args, offline_env):
    script = tmp_path / "faulty_rank.py"
    script.write_text(FAULTY_RANK)
    env = {**offline_env, "FAULT": "raise", "FAULT_STEP": "3"}
    args = [*tiny_set_args, *RUN, *TWO_PROCESSES, "--out", str(tmp_path / "run")]
    failed = torchrun(args, env, tmp_path / "fail.log", script=[str(script)])
    assert failed.returncode != 0, failed.output
    # Both ranks' output is shown, and torchrun's summary names the rank that failed first, and why.
    assert "[rank1]: RuntimeError: rank 1 fails on purpose" in failed.output, failed.output
    root_cause = failed.output.split("Root Cause")[-1]
    assert "rank      : 1" in root_cause and "RuntimeError: rank 1 fails on purpose" in root_cause


def test_shards_cover_the_step_in_order_and_differ_by_at_most_one():
    step = list(range(8))
    for size in (1, 2, 3, 8, 9):
        shards = [World(rank=rank, size=size).shard(step) for rank in range(size)]
        assert [i for shard in shards for i in shard] == step
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert World.from_env().size == 1 and World.from_env().is_main  # a plain run is a world of one


def test_two_processes_train_a_llama_as_one_does(tmp_path, tiny_set_args, offline_env):
    """DDP is architecture-blind: rotary positions, RMSNorm, SwiGLU and shared key/value heads too."""
    llama = [
        "--set",
        "arch=llama",
        "--set",
        "n_kv_heads=1",
        "--set",
        "max_steps=6",
        "--set",
        "eval_interval=3",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    done = torchrun(
        [*tiny_set_args, *RUN, *llama, *TWO_PROCESSES, "--out", str(two)], offline_env, tmp_path / "log"
    )
    assert done.returncode == 0, done.output
    assert main(["train", *tiny_set_args, *RUN, *llama, *ONE_PROCESS, "--out", str(one)]) == 0
    assert_close(metrics(two), metrics(one))
