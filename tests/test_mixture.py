"""Mixtures: several sources in one run, each step's examples drawn by their weights, reproducibly by seed and
step, so a resumed run computes the same losses as the run left alone."""

import json
from collections import Counter

import pytest

from tinylm.config import apply_overrides, load_config_file
from tinylm.data.mixture import BLOCK_STEPS, Component, DataPart, MixtureOrder, parse_sources
from tinylm.data.prepare import prepare_data
from tinylm.data.sources import DataError
from tinylm.train import train

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 40


def test_sources_take_optional_weights_after_their_last_colon():
    assert parse_sources("a.txt:0.3,b.jsonl:0.7") == [Component("a.txt", 0.3), Component("b.jsonl", 0.7)]
    assert parse_sources("synthetic") == [Component("synthetic", 1.0)]
    assert parse_sources("hf:user/name:3, notes.txt") == [
        Component("hf:user/name", 0.75),
        Component("notes.txt", 0.25),
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a.txt:0,b.txt", "the weight of a.txt must be a positive number, got 0"),
        ("a.txt:-1", "the weight of a.txt must be a positive number, got -1"),
        ("a.txt,,b.txt", "an empty source between commas"),
        ("a.txt:1,a.txt:2", "a.txt is named twice"),
    ],
)
def test_a_bad_mixture_names_the_source(spec, expected):
    with pytest.raises(DataError, match=expected):
        parse_sources(spec)


def test_a_config_file_may_list_the_sources_or_give_a_table_of_weights(tmp_path, make_config):
    listed, table = tmp_path / "listed.yaml", tmp_path / "table.toml"
    listed.write_text("data:\n  source: [a.txt:0.3, synthetic]\n")
    table.write_text('[data.source]\n"a.txt" = 0.3\nsynthetic = 0.7\n')
    assert load_config_file(listed).data.source == "a.txt:0.3,synthetic"
    assert load_config_file(table).data.source == "a.txt:0.3,synthetic:0.7"


def test_each_source_is_drawn_by_its_weight_and_walks_through_all_its_examples():
    parts = [DataPart("small", 0.3, 0, 50), DataPart("large", 0.7, 50, 5000)]
    order = MixtureOrder(parts, seed=1, per_step=16)
    drawn = [i for step in range(3000) for i in order(step)]
    assert len(drawn) == 3000 * 16
    small = [i for i in drawn if i < 50]
    assert len(small) / len(drawn) == pytest.approx(0.3, abs=0.01)
    counts = Counter(small)  # round after round through the small source, each example once a round
    assert set(counts) == set(range(50)) and max(counts.values()) - min(counts.values()) <= 1


def test_a_step_takes_the_same_examples_however_the_run_got_there():
    parts = [DataPart("a", 0.5, 0, 7), DataPart("b", 0.25, 7, 30), DataPart("c", 0.25, 37, 11)]
    walked = MixtureOrder(parts, seed=3, per_step=5)
    sequence = {step: walked(step) for step in range(2 * BLOCK_STEPS + 5)}
    for step in (0, 1, BLOCK_STEPS - 1, BLOCK_STEPS, 2 * BLOCK_STEPS + 4):
        assert MixtureOrder(parts, seed=3, per_step=5)(step) == sequence[step]
    assert (
        MixtureOrder(parts, seed=4, per_step=5)(0) != sequence[0]
        or MixtureOrder(parts, seed=4, per_step=5)(1) != sequence[1]
    )


@pytest.fixture
def mixed_config(tmp_path, make_config):
    text = tmp_path / "book.txt"
    text.write_text(TEXT)
    config = make_config(max_steps=10, save_interval=4, eval_interval=5, gradient_accumulation_steps=2)
    return apply_overrides(config, {"source": f"synthetic:0.7,{text}:0.3", "dropout": 0.1})


def test_a_mixture_lays_its_sources_end_to_end_with_their_weights(mixed_config):
    data = prepare_data(mixed_config)
    synthetic, text = data.parts
    alone = prepare_data(apply_overrides(mixed_config, {"source": "synthetic"}))
    assert (synthetic.source, synthetic.weight, synthetic.start, synthetic.size) == (
        "synthetic",
        0.7,
        0,
        len(alone.train),
    )
    assert text.start == synthetic.size and text.size == len(data.train) - synthetic.size > 0
    assert text.weight == pytest.approx(0.3)
    assert len(data.val) == len(alone.val) + len(
        prepare_data(apply_overrides(mixed_config, {"source": text.source})).val
    )


def metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "tokens_per_sec"} for line in lines]


def test_stop_and_resume_of_a_mixture_gives_the_same_losses_bit_for_bit(tmp_path, mixed_config):
    alone, resumed = tmp_path / "alone", tmp_path / "resumed"
    train(mixed_config, out_dir=alone, progress_bar=False)
    train(mixed_config, out_dir=resumed, progress_bar=False)
    # Back to step 4 (dropout's random state and the mixture's position with it), then on to the end.
    train(mixed_config, resume=resumed / "checkpoint_step_4.pt", progress_bar=False)
    assert metrics(resumed) == metrics(alone)
    assert len([m for m in metrics(alone) if "loss" in m]) == 10
