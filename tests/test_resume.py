"""Resume that really resumes: a stopped or killed run, resumed, logs the uninterrupted run's losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tinylm.train as train_module
from tinylm import checkpoint as ckpt
from tinylm.cli import main
from tinylm.config import apply_overrides
from tinylm.run_folder import RunFolderError
from tinylm.train import TrainingError, train

# Accumulation and dropout, so a resume must restore the data position and the random state exactly.
# Micro-batches of 4 unpacked examples, 3 a step, so a stop can fall between accumulation steps.
RESUMABLE = {
    "gradient_accumulation_steps": 3,
    "batch_size": 4,
    "micro_batch_size": 4,
    "max_steps": 14,
    "eval_interval": 5,
}


def resumable_config(make_config, **train):
    config = make_config(**{**RESUMABLE, **train})
    return apply_overrides(config, {"dropout": 0.1, "packing": False})


def metrics(run_dir):
    """Every logged line but the throughput (which depends on the machine's speed)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "tokens_per_sec"} for line in lines]


def losses(run_dir):
    return [(m["step"], m["loss"]) for m in metrics(run_dir) if "loss" in m]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, make_config):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(resumable_config(make_config), out_dir=run_dir, progress_bar=False)
    return metrics(run_dir)


def interrupt_during(monkeypatch, *, call: int, action):
    """Run `action` in the middle of a step: at the `call`-th micro-batch forward pass, counting from 1."""
    calls = {"n": 0}
    real = train_module.lm_loss

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "lm_loss", counting)


def test_ctrl_c_mid_accumulation_saves_the_step_and_resume_matches_bit_for_bit(
    tmp_path, make_config, monkeypatch, uninterrupted
):
    config = resumable_config(make_config)
    # An epoch is 16 micro-batches of 4: 6 steps of 3, 3, 3, 3, 3 and 1. Forward pass 21 is the 2nd
    # micro-batch of step 8, mid-epoch 2.
    interrupt_during(monkeypatch, call=16 + 3 + 2, action=lambda: os.kill(os.getpid(), signal.SIGINT))
    first = train(config, out_dir=tmp_path, progress_bar=False)
    assert first.interrupted and first.step == 8  # the step under way is finished, then saved
    assert ckpt.read_checkpoint(tmp_path / ckpt.LATEST)[1]["step"] == 8
    monkeypatch.undo()

    resumed = train(config, resume=tmp_path, progress_bar=False)
    assert not resumed.interrupted and resumed.step == 14
    assert metrics(tmp_path) == uninterrupted  # bit-identical losses, evaluations and samples, each step once


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)],
)
def test_a_second_signal_mid_accumulation_stops_at_once_and_resume_matches_bit_for_bit(
    tmp_path, make_config, monkeypatch, uninterrupted, signals
):
    config = resumable_config(make_config)

    def press_twice():
        for sig in signals:
            os.kill(os.getpid(), sig)

    interrupt_during(monkeypatch, call=16 + 3 + 2, action=press_twice)  # the 2nd micro-batch of step 8
    first = train(config, out_dir=tmp_path, progress_bar=False)
    # Step 8 is dropped half done; the save holds the state it started from, random states included.
    assert first.interrupted and first.step == 7
    assert ckpt.read_checkpoint(tmp_path / ckpt.LATEST)[1]["step"] == 7
    monkeypatch.undo()
    train(config, resume=tmp_path, progress_bar=False)
    assert metrics(tmp_path) == uninterrupted


def test_crash_mid_accumulation_resumes_from_the_last_save_bit_for_bit(
    tmp_path, make_config, monkeypatch, uninterrupted
):
    config = resumable_config(make_config, save_interval=4)

    def crash():
        raise RuntimeError("power cut")

    interrupt_during(monkeypatch, call=16 + 4 * 3 + 2, action=crash)  # the 2nd micro-batch of step 11
    with pytest.raises(RuntimeError, match="power cut"):
        train(config, out_dir=tmp_path, progress_bar=False)
    assert ckpt.read_checkpoint(tmp_path / ckpt.LATEST)[1]["step"] == 8
    monkeypatch.undo()

    train(config, resume=tmp_path, progress_bar=False)
    # Steps 9 and 10 were logged twice in all, but the file holds each once, as the run left alone does.
    assert metrics(tmp_path) == uninterrupted


def test_resume_from_an_older_checkpoint_file_drops_the_later_metrics(tmp_path, make_config, uninterrupted):
    config = resumable_config(make_config, save_interval=4)
    train(config, out_dir=tmp_path, progress_bar=False)
    train(config, resume=tmp_path / "checkpoint_step_4.pt", progress_bar=False)
    assert metrics(tmp_path) == uninterrupted


def test_raising_max_steps_on_resume_keeps_the_planned_schedule(tmp_path, make_config):
    config = resumable_config(make_config, max_steps=6, eval_interval=100)
    train(config, out_dir=tmp_path, progress_bar=False)
    longer = apply_overrides(config, {"max_steps": 9})
    assert train(longer, resume=tmp_path, progress_bar=False).step == 9
    assert ckpt.read_checkpoint(tmp_path / ckpt.LATEST)[1]["train_state"]["schedule"]["total_steps"] == 6
    lrs = {m["step"]: m["lr"] for m in metrics(tmp_path) if "lr" in m}
    assert [lrs[s] for s in (7, 8, 9)] == [config.train.min_learning_rate] * 3
    assert lrs[6] > config.train.min_learning_rate  # the planned schedule, not one stretched to step 9


def test_resuming_a_finished_run_says_so_and_trains_nothing(tmp_path, make_config, caplog):
    config = resumable_config(make_config, max_steps=3)
    train(config, out_dir=tmp_path, progress_bar=False)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    caplog.set_level("INFO", logger="tinylm")
    assert train(config, resume=tmp_path, progress_bar=False).step == 3
    assert "complete at step 3" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_to_change_the_model_or_the_data_order(tmp_path, make_config):
    config = resumable_config(make_config, max_steps=2)
    train(config, out_dir=tmp_path, progress_bar=False)
    for change, field in (({"d_model": 64}, "model.d_model"), ({"batch_size": 8}, "train.batch_size")):
        with pytest.raises(RunFolderError, match=rf"cannot change {field} \(the run has .*--init-from"):
            train(apply_overrides(config, change), resume=tmp_path, progress_bar=False)


def test_best_model_checkpoint_cannot_be_resumed_and_says_what_to_do(tmp_path, make_config):
    config = resumable_config(make_config, max_steps=2)
    train(config, out_dir=tmp_path, progress_bar=False)
    with pytest.raises(TrainingError, match=r"no training state.*--init-from"):
        train(config, resume=tmp_path / ckpt.BEST, progress_bar=False)


def test_resume_of_a_folder_without_a_checkpoint_names_it(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    expected = f"{tmp_path / 'latest.pt'} does not exist: {tmp_path} holds no run to resume"
    assert expected in capsys.readouterr().err


def test_resume_takes_the_config_from_the_checkpoint(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--preset", "v1"]) == 2
    assert "--resume takes the run's config from its checkpoint" in capsys.readouterr().err


# -- killing a real training process ---------------------------------------------------------------------

# Saving at every step, so that kills land in the middle of writing a checkpoint as well as of a step.
KILL_ARGS = ["--set", "max_steps=24", "--set", "save_interval=1", "--set", "log_interval=1"]
KILL_ARGS += ["--set", "eval_interval=10", "--set", "gradient_accumulation_steps=2", "--set", "dropout=0.1"]


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line) if path.exists() else 0


def start(args, env, log):
    command = [sys.executable, "-m", "tinylm", "train", "--quiet", *args]
    return subprocess.Popen(command, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def kill_after(process, run_dir, steps, log, deadline=120.0):
    """SIGKILL the process as soon as the metrics file shows `steps` training steps (mid-step or mid-save)."""
    stop = time.monotonic() + deadline
    while logged_steps(run_dir) < steps:
        if process.poll() is not None:
            pytest.fail(f"training ended before step {steps}: {log.read_text()[-2000:]}")
        if time.monotonic() > stop:
            process.kill()
            pytest.fail(f"no step {steps} within {deadline} s")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_killed_at_several_points_always_resumable_and_ends_as_if_never_killed(
    tmp_path, tiny_set_args, offline_env, repo_root
):
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    args = [*tiny_set_args, *KILL_ARGS, "--data", "synthetic"]
    assert main(["train", "--quiet", *args, "--out", str(reference)]) == 0

    env = {**offline_env, "TINYLM_CACHE": os.environ["TINYLM_CACHE"], "PYTHONPATH": str(repo_root)}
    log = tmp_path / "output.log"
    for number, stop_at in enumerate((3, 10, 17)):
        process = start(["--resume", str(run_dir)] if number else [*args, "--out", str(run_dir)], env, log)
        kill_after(process, run_dir, stop_at, log)
        _, payload = ckpt.read_checkpoint(run_dir / ckpt.LATEST)  # never half-written
        assert payload["train_state"] and stop_at - 1 <= payload["step"] <= stop_at + 1
    assert main(["train", "--quiet", "--resume", str(run_dir)]) == 0  # the last stretch in this process
    assert metrics(run_dir) == metrics(reference)
    assert not list(run_dir.glob(".*.tmp"))
    weights = ckpt.load_model(run_dir / ckpt.LATEST).model.state_dict()
    expected = ckpt.load_model(reference / ckpt.LATEST).model.state_dict()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
