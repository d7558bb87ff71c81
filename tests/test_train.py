"""The Trainer: losses fall, a seeded run repeats exactly, and a resumed run equals an uninterrupted one."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from tinylm.checkpoint import BEST, LATEST, load_model, read_checkpoint
from tinylm.config import TrainConfig, apply_overrides
from tinylm.train import Trainer, TrainingError, learning_rate


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step from a run's metrics.jsonl; a step logged twice would be a bug."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory, make_config):
    """The same seeded 30-step run, twice."""
    dirs = [tmp_path_factory.mktemp(name) for name in ("first", "second")]
    results = [Trainer(make_config(max_steps=30), out_dir=d).run() for d in dirs]
    return dirs, results


def test_losses_fall_in_a_short_seeded_run(seeded_runs):
    (run, _), (result, _) = seeded_runs
    by_step = losses(run)
    assert sorted(by_step) == list(range(1, 31))
    assert result.step == 30 and not result.interrupted
    assert by_step[30] < by_step[1] - 1.0  # from ~ln(257) = 5.5 towards the data's entropy
    assert by_step[1] == pytest.approx(math.log(257), abs=0.3)  # a fresh model is close to uniform
    assert result.best_val_loss is not None and result.best_val_loss < by_step[1]


def test_the_same_seed_gives_the_same_losses(seeded_runs):
    first, second = (losses(d) for d in seeded_runs[0])
    assert first == second


def test_a_run_folder_holds_what_inference_needs(seeded_runs):
    run = seeded_runs[0][0]
    assert {p.name for p in run.iterdir()} >= {BEST, LATEST, "metrics.jsonl", "config.json"}
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    loaded = load_model(run / BEST)
    assert loaded.config.model.vocab_size == loaded.tokenizer.vocab_size == 257
    assert read_checkpoint(run / LATEST)[1]["step"] == 30
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in evaluations if "val_loss" in e][-1]
    assert last["step"] == 30 and len(last["samples"]) == 3
    assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, make_config):
    """Every target token weighs the same whether a step is one batch of 8 or 4 micro-batches of 2."""
    Trainer(make_config(max_steps=3), out_dir=tmp_path / "one").run()
    config = make_config(max_steps=3, batch_size=2, gradient_accumulation_steps=4)
    Trainer(config, out_dir=tmp_path / "many").run()
    one, many = losses(tmp_path / "one"), losses(tmp_path / "many")
    assert one.keys() == many.keys() == {1, 2, 3}
    assert list(many.values()) == pytest.approx(list(one.values()), rel=1e-5)
    weights = [load_model(tmp_path / run / LATEST).model.state_dict() for run in ("one", "many")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


def grads_at_the_optimizer(tmp_path: Path, config) -> list[torch.Tensor]:
    """The gradients the optimizer sees in the first step of a run of `config`."""
    trainer = Trainer(config, out_dir=tmp_path)
    trainer.build()
    seen: list[torch.Tensor] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.extend(p.grad.clone() for p in trainer.model.parameters())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train_step()
    return seen


@pytest.mark.parametrize("grad_clip", [1e-3, 1e6])
def test_gradients_reach_the_optimizer_clipped_to_grad_clip_or_untouched(tmp_path, make_config, grad_clip):
    raw = grads_at_the_optimizer(tmp_path / "raw", make_config(max_steps=1, grad_clip=0.0))
    got = grads_at_the_optimizer(tmp_path / "clip", make_config(max_steps=1, grad_clip=grad_clip))
    raw_norm = torch.nn.utils.get_total_norm(raw).item()
    assert 1e-3 < raw_norm < 1e6
    scale = min(1.0, grad_clip / raw_norm)
    for r, g in zip(raw, got, strict=True):
        torch.testing.assert_close(g, r * scale, rtol=1e-5, atol=1e-9)


def test_learning_rate_warms_up_then_decays_to_the_minimum():
    train = TrainConfig(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10)
    rates = [learning_rate(step, train, 100) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(rates[:10]))
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[100] == pytest.approx(1e-4)
    assert learning_rate(55, train, 100) == pytest.approx(5.5e-4)  # halfway down the cosine


def test_an_existing_run_folder_is_protected(tmp_path, make_config):
    Trainer(make_config(max_steps=2), out_dir=tmp_path).run()
    with pytest.raises(TrainingError, match=r"--resume.*--overwrite"):
        Trainer(make_config(max_steps=2), out_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    result = Trainer(make_config(max_steps=3), out_dir=tmp_path, overwrite=True).run()
    assert result.step == 3
    assert sorted(losses(tmp_path)) == [1, 2, 3]  # the old run's metrics are gone, not appended to
    assert (tmp_path / "notes.txt").read_text() == "mine"  # files the run did not write are kept


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, make_config, monkeypatch):
    # Dropout on, so the resumed run must also restore the random state.
    config = apply_overrides(make_config(max_steps=6, save_interval=3), {"dropout": 0.1})
    Trainer(config, out_dir=tmp_path / "a").run()

    real_step = Trainer.train_step
    calls = []

    def interrupt_on_fourth_step(self):
        calls.append(self.step)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupt_on_fourth_step)
    stopped = Trainer(config, out_dir=tmp_path / "b").run()
    monkeypatch.undo()
    assert (stopped.step, stopped.interrupted) == (3, True)
    assert read_checkpoint(tmp_path / "b" / LATEST)[1]["step"] == 3

    resumed = Trainer(config, out_dir=tmp_path / "b", resume=True).run()
    assert (resumed.step, resumed.interrupted) == (6, False)
    uninterrupted, interrupted_then_resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(interrupted_then_resumed) == [1, 2, 3, 4, 5, 6]
    assert interrupted_then_resumed == uninterrupted
    final_a, final_b = (load_model(tmp_path / run / LATEST).model for run in ("a", "b"))
    for a, b in zip(final_a.state_dict().values(), final_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_needs_a_latest_checkpoint(tmp_path, tiny_config):
    with pytest.raises(Exception, match=r"latest\.pt does not exist"):
        Trainer(tiny_config, out_dir=tmp_path, resume=True)
