"""Guard rails: a run that goes wrong says what happened and what to do, and keeps its last checkpoint."""

import math

import pytest
import torch

import tinylm.train as train_module
from tinylm import checkpoint as ckpt
from tinylm.cli import main
from tinylm.run_folder import RunFolderError
from tinylm.state import OVERFIT_EVALS, ValidationWatch
from tinylm.train import TrainingError, train


def fail_at_step(monkeypatch, step: int, make_result):
    """From optimizer step `step` on (1-based; one micro-batch a step), the training loss is whatever
    `make_result` gives."""
    real = train_module.lm_loss
    seen = {"calls": 0}

    def patched(model, inputs, targets, **options):
        seen["calls"] += 1
        if seen["calls"] >= step:
            return make_result(real(model, inputs, targets, **options))
        return real(model, inputs, targets, **options)

    monkeypatch.setattr(train_module, "lm_loss", patched)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, make_config, monkeypatch
):
    fail_at_step(monkeypatch, 5, lambda result: (result[0] * float("nan"), result[1]))
    with pytest.raises(
        TrainingError, match=r"loss became nan at step 5; stopped\. The last checkpoint, .*step 4"
    ):
        train(make_config(save_interval=2), out_dir=tmp_path, progress_bar=False)
    loaded = ckpt.load_model(tmp_path / ckpt.LATEST)
    assert loaded.info["step"] == 4
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_out_of_memory_names_the_settings_to_lower_and_keeps_the_checkpoint(
    tmp_path, make_config, monkeypatch
):
    def out_of_memory(result):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fail_at_step(monkeypatch, 4, out_of_memory)
    with pytest.raises(TrainingError) as error:
        train(make_config(save_interval=2), out_dir=tmp_path, progress_bar=False)
    message = str(error.value)
    assert message.startswith("out of memory at step 4 on cpu: lower train.batch_size (now 8;")
    assert "model.max_seq_length (now 64)" in message and "model.gradient_checkpointing on" in message
    assert f"{tmp_path / ckpt.LATEST} (step 2), is kept" in message
    assert ckpt.read_checkpoint(tmp_path / ckpt.LATEST)[1]["step"] == 2


def test_out_of_memory_on_the_command_line_is_one_error_line(tmp_path, tiny_set_args, monkeypatch, capsys):
    def out_of_memory(result):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)")

    fail_at_step(monkeypatch, 2, out_of_memory)
    args = ["train", "--quiet", *tiny_set_args, "--set", "gradient_accumulation_steps=1"]
    assert main([*args, "--data", "synthetic", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: out of memory at step 2 on cpu: lower train.batch_size"
    )
    assert (tmp_path / ckpt.LATEST).is_file()


def test_an_existing_run_is_never_overwritten_silently(tmp_path, make_config):
    config = make_config(max_steps=2)
    train(config, out_dir=tmp_path, progress_bar=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RunFolderError, match=rf"{tmp_path} already holds a run: resume it with --resume"):
        train(config, out_dir=tmp_path, progress_bar=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # --overwrite starts afresh (old tracker logs go too); files a user keeps there stay.
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"old run")
    train(make_config(max_steps=1), out_dir=tmp_path, overwrite=True, progress_bar=False)
    assert ckpt.read_checkpoint(tmp_path / ckpt.LATEST)[1]["step"] == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "tensorboard").exists()


def watch_through(val_losses, train_losses, patience=0):
    watch, messages = ValidationWatch(patience=patience), []
    for step, (val, loss) in enumerate(zip(val_losses, train_losses, strict=True), start=1):
        watch.add_train_loss(loss)
        watch.update(step, val)
        messages.append(watch.overfitting())
    return watch, messages


def test_overfitting_is_said_once_when_validation_stalls_while_training_loss_falls():
    val = [3.0, 2.5, 2.6, 2.7, 2.8, 2.9]
    train = [3.0, 2.4, 2.0, 1.6, 1.2, 0.8]
    _, messages = watch_through(val, train)
    warnings = [(i, m) for i, m in enumerate(messages) if m]
    assert len(warnings) == 1 and warnings[0][0] == 1 + OVERFIT_EVALS
    assert "not improved for 3 evaluations (best 2.5000 at step 2)" in warnings[0][1]
    assert "training loss fell from 2.4000 to 1.2000" in warnings[0][1]
    assert "more data" in warnings[0][1] and "dropout" in warnings[0][1] and "learning_rate" in warnings[0][1]


def test_no_overfitting_warning_while_both_losses_fall_or_both_stall():
    assert not any(watch_through([3.0, 2.5, 2.2, 2.0, 1.9], [3.0, 2.5, 2.2, 2.0, 1.9])[1])
    assert not any(watch_through([2.0, 2.1, 2.1, 2.2, 2.2], [2.0, 2.1, 2.1, 2.2, 2.2])[1])


def test_early_stopping_after_patience_evaluations_without_a_new_best():
    watch, _ = watch_through([3.0, 2.5, 2.6, 2.55], [3.0, 2.5, 2.4, 2.3], patience=2)
    assert watch.should_stop() and watch.best_step == 2
    assert not watch_through([3.0, 2.5, 2.6], [3.0, 2.5, 2.4], patience=2)[0].should_stop()
    assert not watch_through([3.0, 2.5, 2.6, 2.7], [3.0, 2.5, 2.4, 2.3], patience=0)[0].should_stop()


def test_a_run_that_overfits_says_so_and_stops_early(tmp_path, make_config, caplog):
    from tinylm.config import apply_overrides

    # Eight records memorised at a high learning rate: training loss falls, validation loss rises.
    config = make_config(max_steps=400, eval_interval=10, learning_rate=1e-2, early_stopping_patience=5)
    config = apply_overrides(config, {"dataset_size": 8, "val_fraction": 0.5, "warmup_steps": 1})
    caplog.set_level("INFO", logger="tinylm")
    result = train(config, out_dir=tmp_path, progress_bar=False)
    assert result.stop_reason == "early stopping" and result.step < 400
    assert "the model is overfitting" in caplog.text
    assert "early stopping: validation loss has not improved for 5 evaluations" in caplog.text
    best = ckpt.load_model(tmp_path / ckpt.BEST)
    assert math.isclose(best.info["best_val_loss"], result.best_val_loss)
    assert ckpt.read_checkpoint(tmp_path / ckpt.LATEST)[1]["step"] == result.step


def test_a_window_that_leaves_no_target_fails_before_training_naming_max_seq_length(
    tmp_path, tiny_set_args, capsys
):
    args = ["train", *tiny_set_args, "--quiet", "--data", "synthetic", "--out", str(tmp_path)]
    assert main([*args, "--set", "max_seq_length=2"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: no training example keeps a token to learn at model.max_seq_length = 2")
    assert not list(tmp_path.glob("*.pt")) and not (tmp_path / "metrics.jsonl").exists()


def test_a_run_too_big_for_the_memory_is_refused_before_anything_is_built(tmp_path, tiny_set_args, capsys):
    args = ["train", *tiny_set_args, "--quiet", "--data", "synthetic", "--out", str(tmp_path)]
    assert main([*args, "--set", "n_layers=10000000"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: this run needs about ") and "lower model.n_layers (now 10000000)" in line
    assert not list(tmp_path.glob("*.pt"))
