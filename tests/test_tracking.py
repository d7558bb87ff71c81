"""Progress you can see: the console, metrics.jsonl, loss.png, `tinylm plot`, wandb and TensorBoard."""

import importlib.util
import io
import json
import socket
import subprocess
import sys
import time

import pytest

from tinylm.cli import main
from tinylm.tracking import ConsoleTracker, JsonlTracker, build_trackers, read_metrics, wandb_wanted
from tinylm.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, make_config):
    run_dir = tmp_path_factory.mktemp("run")
    train(make_config(max_steps=12, eval_interval=5, log_interval=2), out_dir=run_dir, progress_bar=False)
    return run_dir


def test_run_folder_holds_config_metrics_and_plot(finished_run, make_config):
    config = json.loads((finished_run / "config.json").read_text())
    assert config["train"]["max_steps"] == 12 and config["model"]["vocab_size"] == 257
    lines = read_metrics(finished_run)
    logged = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in logged] == [2, 4, 6, 8, 10, 12]
    assert all({"step", "epoch", "loss", "lr", "tokens_per_sec"} <= m.keys() for m in logged)
    assert all(m["tokens_per_sec"] > 0 for m in logged)
    assert [m["step"] for m in evals] == [5, 10, 12]  # every eval_interval, and at the end
    for m in evals:
        assert m["val_perplexity"] == pytest.approx(2.718281828459045 ** m["val_loss"])
        assert len(m["samples"]) == 3 and all({"prompt", "completion"} == s.keys() for s in m["samples"])
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert (finished_run / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_command_draws_several_runs_on_one_chart(finished_run, tmp_path, capsys):
    out = tmp_path / "compare.png"
    assert main(["plot", str(finished_run), str(finished_run / "metrics.jsonl"), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert f"wrote {out}" in capsys.readouterr().out


def test_plot_of_a_folder_without_metrics_is_an_error_naming_it(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path}: no metrics to plot (expected metrics.jsonl with logged steps)"
    )
    assert not (tmp_path / "x.png").exists()


def test_resumed_metrics_file_drops_lines_past_the_resumed_step_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 7, "lo')
    tracker = JsonlTracker(path, start_step=4)
    tracker.log({"loss": 0.5}, step=5)
    tracker.close()
    assert read_metrics(path) == [*lines[:4], {"step": 5, "loss": 0.5}]


def test_console_writes_plain_lines_with_an_eta_when_there_is_no_bar(caplog):
    caplog.set_level("INFO", logger="tinylm")
    console = ConsoleTracker(total_steps=100, start_step=40, bar=False)
    console.log({"epoch": 1.5, "loss": 2.25, "lr": 3e-4, "tokens_per_sec": 12345.0}, step=50)
    console.log({"val_loss": 2.5, "samples": [{"prompt": "Add 2 and 3.", "completion": " 5\n"}]}, step=50)
    console.close()
    lines = [record.getMessage() for record in caplog.records]
    assert any(
        line.startswith(
            "step 50/100 | epoch 1.5000 | loss 2.2500 | lr 3.00e-04 | tokens_per_sec 12,345 | eta "
        )
        for line in lines
    )
    assert any("sample | Add 2 and 3. -> 5" in line for line in lines)
    assert any(line.endswith("step 50/100 | val_loss 2.5000") for line in lines)


def test_console_draws_a_progress_bar_on_a_terminal(monkeypatch):
    screen = io.StringIO()
    screen.isatty = lambda: True
    monkeypatch.setattr("sys.stdout", screen)
    monkeypatch.setenv("COLUMNS", "120")
    console = ConsoleTracker(total_steps=200, start_step=100)  # resumed: the bar starts at 100
    console.advance(150)
    console.log({"epoch": 2.5, "loss": 1.75, "lr": 1e-4, "tokens_per_sec": 5000.0}, step=150)
    console.advance(151)
    console.close()
    text = screen.getvalue()
    assert "step 151/200" in text
    assert "epoch 2.50 | loss 1.7500 | lr 1.00e-04 | 5,000 tok/s" in text


def test_quiet_training_prints_plain_lines(tmp_path, tiny_set_args, capsys):
    args = ["train", "--quiet", *tiny_set_args, "--set", "max_steps=2", "--set", "log_interval=1"]
    assert main([*args, "--data", "synthetic", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 1/2 | epoch" in out and "step 2/2 | val_loss" in out


def test_dotenv_project_turns_wandb_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Set, then removed: so monkeypatch removes what the .env file sets, whatever was there before.
    monkeypatch.setenv("WANDB_PROJECT", "placeholder")
    monkeypatch.delenv("WANDB_PROJECT")
    assert not wandb_wanted(False)
    (tmp_path / ".env").write_text("WANDB_PROJECT=tinylm-tests\n")
    assert wandb_wanted(False)


needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_wandb
@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({}, "no WANDB_API_KEY (set it in .env or the environment)"),
        (
            {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"},
            "cannot reach 127.0.0.1",
        ),
    ],
)
def test_wandb_without_a_key_or_a_network_goes_offline_in_one_line(
    tmp_path, monkeypatch, caplog, env, reason
):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    caplog.set_level("INFO", logger="tinylm")
    trackers = build_trackers(tmp_path, config={}, start_step=0, total_steps=1, wandb=True, bar=False)
    trackers.close()
    wandb_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wandb:")]
    assert len(wandb_lines) == 1 and wandb_lines[0].startswith(f"wandb: offline ({reason}")


def wandb_records(run_dir, *, count, holding=b"val_loss", timeout=30.0):
    """The bytes of every offline wandb run in the folder, by "run folder/run-<id>.wandb", once `count` runs
    hold `holding`: wandb's service may still be writing a run's file when `finish()` returns."""
    deadline = time.monotonic() + timeout
    while True:
        runs = {
            f"{p.parent.name}/{p.name}": p.read_bytes()
            for p in run_dir.glob("wandb/offline-run-*/run-*.wandb")
        }
        if sum(holding in data for data in runs.values()) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


@needs_wandb
def test_wandb_offline_logs_metrics_and_samples_and_a_resume_continues_the_same_run(
    tmp_path, make_config, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = make_config(max_steps=4, eval_interval=2, wandb=True)
    train(config, out_dir=tmp_path, progress_bar=False)
    run_id = json.loads((tmp_path / "wandb.json").read_text())["id"]
    records = wandb_records(tmp_path, count=1)
    assert len(records) == 1 and next(iter(records)).endswith(f"/run-{run_id}.wandb")
    data = next(iter(records.values()))
    for key in (b"tokens_per_sec", b"val_loss", b"val_perplexity"):
        assert key in data
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    assert tables
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion"] and len(table["data"]) == 3

    from tinylm.config import apply_overrides

    train(apply_overrides(config, {"max_steps": 6}), resume=tmp_path, progress_bar=False)
    assert json.loads((tmp_path / "wandb.json").read_text())["id"] == run_id
    runs = wandb_records(tmp_path, count=2)
    # Both files carry the run's id; the folders may not end with it (wandb adds "-1" to the second
    # folder's name when both runs started in the same second).
    assert len(runs) == 2 and all(name.endswith(f"/run-{run_id}.wandb") for name in runs), (
        run_id,
        list(runs),
    )


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_writes_event_files(tmp_path, make_config):
    train(make_config(max_steps=2, tensorboard=True), out_dir=tmp_path, progress_bar=False)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert b"val_loss" in events[0].read_bytes()


def test_optional_trackers_are_not_imported_unless_configured(tmp_path, offline_env, repo_root):
    script = (
        "import sys; from pathlib import Path; from tinylm.tracking import build_trackers; "
        "build_trackers(Path('.'), config={}, start_step=0, total_steps=1, bar=False).close(); "
        "print(sorted(m for m in ('wandb', 'torch', 'torch.utils.tensorboard') if m in sys.modules))"
    )
    env = {**offline_env, "PYTHONPATH": str(repo_root)}
    env.pop("WANDB_PROJECT", None)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
