"""The training levers beside the reference design: Muon for the blocks' matrices (AdamW for the rest) and
the warm-up/stable/decay (WSD) schedule. Each trains and resumes bit for bit; the defaults stay AdamW."""

import itertools
import os
import signal

import pytest
import torch
from test_resume import interrupt_during, metrics, resumable_config

from tinylm.config import TrainConfig, apply_overrides
from tinylm.model import TinyLM
from tinylm.run_folder import RunFolderError
from tinylm.state import build_optimizer, learning_rate
from tinylm.train import build_training, train, train_step

CPU = torch.device("cpu")
# The weight matrices inside a block: what Muon takes.
BLOCK_MATRICES = ("attn.qkv.weight", "attn.proj.weight", "ff.up.weight", "ff.down.weight")


def names_in(optimizer: torch.optim.Optimizer, model: TinyLM) -> list[list[str]]:
    """The parameter names of each of the optimizer's groups."""
    named = {id(p): name for name, p in model.named_parameters()}
    return [[named[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def test_the_default_optimizer_is_adamw_over_every_parameter(tiny_model):
    model = tiny_model()
    optimizer = build_optimizer(model, TrainConfig())
    assert type(optimizer) is torch.optim.AdamW
    assert sorted(itertools.chain(*names_in(optimizer, model))) == sorted(
        n for n, _ in model.named_parameters()
    )


@pytest.mark.parametrize("tied", [False, True])
def test_muon_takes_the_blocks_matrices_and_adamw_everything_else_each_parameter_once(tiny_model, arch, tied):
    model = tiny_model(**arch, tie_weights=tied)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1))
    muon, adamw = optimizer.parts["muon"], optimizer.parts["adamw"]
    (muon_names,) = names_in(muon, model)
    decayed, not_decayed = names_in(adamw, model)
    expected = [f"blocks.{i}.{m}" for i in range(2) for m in BLOCK_MATRICES]
    assert sorted(muon_names) == sorted(expected)
    # AdamW's own rule: every other matrix but the token embedding is decayed (gpt2's learned positions too).
    learned_positions = ["positions.weight"] if arch.get("arch") == "gpt2" else []
    assert decayed == learned_positions + ([] if tied else ["head.weight"])
    everything = [n for n, _ in model.named_parameters()]  # a tied head is the embedding, listed once
    assert sorted(muon_names + decayed + not_decayed) == sorted(everything)
    assert {"embed.weight", "ln_f.weight"} <= set(not_decayed)
    (group,) = muon.param_groups
    assert (group["weight_decay"], group["adjust_lr_fn"]) == (0.1, "match_rms_adamw")


def test_muon_lowers_the_loss_on_a_fixed_batch_and_the_schedule_sets_every_rate(make_config):
    run = build_training(make_config(optimizer="muon"), device=CPU)
    batches = run.batches(0)
    losses = [train_step(run.state, batches, run.config.train) for _ in range(12)]
    assert all(a > b for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0] - 1
    rates = [group["lr"] for group in run.state.optimizer.param_groups]
    assert len(rates) == 3 and set(rates) == {run.state.schedule(11)}  # AdamW's two groups and Muon's


def test_a_stopped_and_resumed_muon_wsd_run_equals_the_run_left_alone(tmp_path, make_config, monkeypatch):
    # The decay starts at step 7 of 14, so the stop after step 8 falls inside it.
    config = resumable_config(make_config, optimizer="muon", schedule="wsd", decay_fraction=0.5)
    train(config, out_dir=tmp_path / "alone", progress_bar=False)
    # The 2nd micro-batch of step 8 (an epoch is 6 steps: 3, 3, 3, 3, 3 and 1 micro-batches).
    interrupt_during(monkeypatch, call=16 + 3 + 2, action=lambda: os.kill(os.getpid(), signal.SIGINT))
    stopped = train(config, out_dir=tmp_path / "stopped", progress_bar=False)
    assert stopped.interrupted and stopped.step == 8
    monkeypatch.undo()
    train(config, resume=tmp_path / "stopped", progress_bar=False)
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "alone")


def test_resume_refuses_another_optimizer(tmp_path, make_config):
    config = resumable_config(make_config, max_steps=2, optimizer="muon")
    train(config, out_dir=tmp_path, progress_bar=False)
    with pytest.raises(
        RunFolderError, match=r"cannot change train\.optimizer \(the run has 'muon', asked 'adamw'\)"
    ):
        train(apply_overrides(config, {"optimizer": "adamw"}), resume=tmp_path, progress_bar=False)


def test_wsd_warms_up_holds_then_falls_in_a_straight_line_to_the_minimum():
    train = TrainConfig(
        learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, schedule="wsd", decay_fraction=0.2
    )
    rates = [learning_rate(step, train, 100) for step in range(106)]
    assert rates[0] == 1e-4 and rates[9] == 1e-3  # the warm-up, as the cosine's
    assert rates[10:80] == [1e-3] * 70  # stable until the last fifth
    assert rates[85] == pytest.approx(7.75e-4) and rates[90] == pytest.approx(5.5e-4)
    assert all(a > b for a, b in itertools.pairwise(rates[80:101]))
    assert rates[100:] == [1e-4] * 6  # the planned end, and past it (a resume with more steps)
