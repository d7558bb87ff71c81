"""Training: losses fall, a seeded run repeats exactly, and a resumed run equals an uninterrupted one."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import tinylm.train as train_module
from tinylm.checkpoint import BEST, LATEST, load_model, read_checkpoint
from tinylm.config import TrainConfig, apply_overrides
from tinylm.distributed import World
from tinylm.evaluate import Evaluator
from tinylm.generate import Engine
from tinylm.state import learning_rate
from tinylm.train import build_training, clip_gradients, train


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
    results = [train(make_config(max_steps=30), out_dir=d) for d in dirs]
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
    train(make_config(max_steps=3), out_dir=tmp_path / "one")
    config = make_config(max_steps=3, batch_size=2, gradient_accumulation_steps=4)
    train(config, out_dir=tmp_path / "many")
    one, many = losses(tmp_path / "one"), losses(tmp_path / "many")
    assert one.keys() == many.keys() == {1, 2, 3}
    assert list(many.values()) == pytest.approx(list(one.values()), rel=1e-5)
    weights = [load_model(tmp_path / run / LATEST).model.state_dict() for run in ("one", "many")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_clipping_scales_gradients_over_the_limit_and_leaves_the_others_untouched(max_norm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    raw = [p.grad.clone() for p in params]
    versions = [p.grad._version for p in params]
    raw_norm = torch.nn.utils.get_total_norm(raw).item()
    assert clip_gradients(params, max_norm).item() == pytest.approx(raw_norm)
    if max_norm > raw_norm:  # not even multiplied by 1.0
        assert [p.grad._version for p in params] == versions
    scale = min(1.0, max_norm / raw_norm)
    for r, p in zip(raw, params, strict=True):
        torch.testing.assert_close(p.grad, r * scale, rtol=1e-6, atol=1e-9)


def test_a_step_built_from_a_config_trains_that_step(make_config):
    """The public seam tests and benchmarks use: build_training, then train_step one step at a time gives
    the losses the run loop logs for the same config."""
    run = build_training(make_config(max_steps=3), device=torch.device("cpu"))
    assert run.state.step == 0
    first = [run.step() for _ in range(3)]
    assert run.state.step == 3
    again = build_training(make_config(max_steps=3), device=torch.device("cpu"))
    assert [again.step() for _ in range(3)] == first


def test_learning_rate_warms_up_then_decays_to_the_minimum():
    train = TrainConfig(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10)
    rates = [learning_rate(step, train, 100) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(rates[:10]))
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[100] == pytest.approx(1e-4)
    assert learning_rate(55, train, 100) == pytest.approx(5.5e-4)  # halfway down the cosine


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, make_config, monkeypatch):
    # Dropout on, so the resumed run must also restore the random state.
    config = apply_overrides(make_config(max_steps=6, save_interval=3), {"dropout": 0.1})
    train(config, out_dir=tmp_path / "a")

    real_step = train_module.train_step
    calls = []

    def interrupt_on_fourth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupt_on_fourth_step)
    stopped = train(config, out_dir=tmp_path / "b")
    monkeypatch.undo()
    assert (stopped.step, stopped.interrupted) == (3, True)
    assert read_checkpoint(tmp_path / "b" / LATEST)[1]["step"] == 3

    resumed = train(config, out_dir=tmp_path / "b", resume=True)
    assert (resumed.step, resumed.interrupted) == (6, False)
    uninterrupted, interrupted_then_resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(interrupted_then_resumed) == [1, 2, 3, 4, 5, 6]
    assert interrupted_then_resumed == uninterrupted
    final_a, final_b = (load_model(tmp_path / run / LATEST).model for run in ("a", "b"))
    for a, b in zip(final_a.state_dict().values(), final_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_needs_a_latest_checkpoint(tmp_path, tiny_config):
    with pytest.raises(Exception, match=r"latest\.pt does not exist"):
        train(tiny_config, out_dir=tmp_path, resume=True)


def test_the_samples_of_an_evaluation_follow_the_steps_since_the_engine_was_made(make_config):
    """The evaluator's engine is made once, before training; each evaluation refreshes its layouts."""
    run = build_training(make_config(max_steps=4, learning_rate=3e-2), device=torch.device("cpu"))
    evaluator = Evaluator(run.data, Engine(run.state.model, run.data.tokenizer), run.config, world=World())
    before = evaluator.samples()
    for _ in range(4):
        run.step()
    after = evaluator.samples()
    run.state.model.eval()
    fresh = Engine(run.state.model, run.data.tokenizer)
    expected = [fresh.complete(p.ids, evaluator.greedy, stop=run.data.stop).text for p in run.data.samples]
    assert [s["completion"] for s in after] == expected != [s["completion"] for s in before]
