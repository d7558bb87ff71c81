"""Configs: presets carry the documented numbers, files and --set load strictly, bad values name the field."""

import dataclasses
from pathlib import Path

import pytest

from tinylm.config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config_file,
    parse_set_args,
    preset,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_v2_preset_has_the_documented_numbers():
    c = preset("v2")
    assert c.data.dataset_size == 10_000
    assert c.train.epochs == 25
    assert c.train.learning_rate == 2e-4
    assert c.train.warmup_steps == 1000
    assert (c.train.batch_size, c.train.gradient_accumulation_steps) == (1, 16)
    assert c.model.max_seq_length == 128
    assert (c.train.eval_interval, c.train.save_interval, c.train.log_interval) == (500, 1000, 25)
    assert c.model.gradient_checkpointing is False  # measured not to pay at this size (docs/benchmarks.md)
    assert (c.model.d_model, c.model.n_heads, c.model.n_layers, c.model.d_ff) == (192, 6, 4, 768)


def test_v1_preset_has_the_documented_numbers():
    c = preset("v1")
    assert (c.model.d_model, c.model.n_heads, c.model.n_layers, c.model.d_ff) == (128, 4, 3, 512)
    assert c.train.epochs == 10
    assert c.data.dataset_size == 5_000
    assert c.train.learning_rate == 3e-4
    assert c.train.warmup_steps == 500
    assert (c.train.eval_interval, c.train.save_interval, c.train.log_interval) == (1000, 2000, 50)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    assert preset(name).validate() == preset(name)


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"demo"}))  # the demo's recipe is its own
def test_presets_keep_the_reference_optimizer_schedule_and_attention(name):
    c = preset(name)
    assert (c.train.optimizer, c.train.schedule, c.model.qk_norm) == ("adamw", "cosine", False)


def test_the_fast_preset_is_v2s_size_and_data_with_the_benchmarks_recipe():
    fast, v2 = preset("v2-fast"), preset("v2")
    assert (fast.model.arch, fast.model.d_ff, fast.model.tie_weights) == ("llama", 512, True)
    assert (fast.train.learning_rate, fast.train.min_learning_rate) == (1e-3, 1e-4)
    same = ("d_model", "n_heads", "n_layers", "max_seq_length", "dropout")
    assert [getattr(fast.model, f) for f in same] == [getattr(v2.model, f) for f in same]
    assert fast.data == v2.data
    assert (fast.train.epochs, fast.train.batch_size, fast.train.gradient_accumulation_steps) == (25, 1, 16)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match=r"'v9'.*v1, v2"):
        preset("v9")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_file_in_configs_folder_matches_its_preset(name):
    files = [CONFIGS / f"{name}{suffix}" for suffix in (".yaml", ".yml", ".toml")]
    present = [f for f in files if f.is_file()]
    if not present:
        pytest.skip(f"no configs/{name}.yaml or .toml")
    for file in present:
        assert load_config_file(file) == preset(name), file


@pytest.mark.parametrize("key", ["d_model", "model.d_model"])
def test_set_accepts_flat_and_dotted_names_and_coerces_types(key):
    config = apply_overrides(Config(), parse_set_args([f"{key}=64", "learning_rate=1e-3", "max_steps=none"]))
    assert config.model.d_model == 64
    assert config.train.learning_rate == 1e-3
    assert config.train.max_steps is None
    assert config.model.n_layers == Config().model.n_layers  # the rest is untouched


@pytest.mark.parametrize("item", ["bogus=1", "model.bogus=1", "nosection.d_model=1"])
def test_unknown_set_key_fails_naming_it(item):
    key = item.partition("=")[0]
    with pytest.raises(ConfigError, match=f"unknown config field '{key}'"):
        apply_overrides(Config(), parse_set_args([item]))


def test_set_without_equals_sign_fails():
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_args(["d_model"])


def test_wrong_type_names_the_field_and_value():
    with pytest.raises(ConfigError, match=r"model\.d_model wants int, got 'big'"):
        apply_overrides(Config(), {"d_model": "big"})
    with pytest.raises(ConfigError, match=r"model\.tie_weights wants bool"):
        apply_overrides(Config(), {"tie_weights": "maybe"})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_heads": 5}, "model.n_heads"),  # 192 is not divisible by 5
        ({"learning_rate": -1e-3}, "train.learning_rate"),
        ({"epochs": 0}, "train.epochs"),
        ({"max_steps": 0}, "train.max_steps"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"tokenizer": "words"}, "data.tokenizer"),
        ({"top_p": 0}, "sampling.top_p"),
        ({"optimizer": "sgd"}, "train.optimizer"),
        ({"schedule": "linear"}, "train.schedule"),
        ({"decay_fraction": 0}, "train.decay_fraction"),
        ({"decay_fraction": 1.5}, "train.decay_fraction"),
        ({"qk_norm": "maybe"}, "model.qk_norm"),
    ],
)
def test_impossible_values_fail_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as caught:
        apply_overrides(Config(), overrides).validate()
    assert "\n" not in str(caught.value)


def test_n_heads_message_names_both_numbers():
    with pytest.raises(ConfigError, match="192 is not divisible by 5"):
        apply_overrides(Config(), {"n_heads": 5}).validate()


def test_yaml_file_with_sections_and_flat_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: v1\nmodel:\n  d_model: 64\n  n_heads: 2\nlearning_rate: 0.001\nmax_steps: 7\n")
    config = load_config_file(path)
    assert config.model.d_model == 64
    assert config.model.n_heads == 2
    assert config.train.learning_rate == 0.001
    assert config.train.max_steps == 7
    assert config.train.epochs == preset("v1").train.epochs  # from the file's preset, not v2


def test_toml_file_with_sections_and_flat_names(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'seed = 7\ntokenizer = "byte"\n\n[model]\nd_model = 64\ntie_weights = true\n\n[train]\nepochs = 3\n'
    )
    config = load_config_file(path, base=preset("v2"))
    assert config.train.seed == 7
    assert config.data.tokenizer == "byte"
    assert config.model.d_model == 64
    assert config.model.tie_weights is True
    assert config.train.epochs == 3
    assert config.train.learning_rate == preset("v2").train.learning_rate


def test_config_file_with_unknown_field_fails_naming_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model]\nwidth = 64\n")
    with pytest.raises(ConfigError, match=r"model\.width"):
        load_config_file(path)


def test_malformed_config_file_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_config_file(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "absent.yaml")


def test_config_survives_a_round_trip_through_a_dict():
    config = apply_overrides(preset("demo"), {"d_model": 64, "max_steps": 5, "gpt2_ranks_path": "/x"})
    assert config_from_dict(config.to_dict()) == config


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("v2").model.d_model = 1  # type: ignore[misc]
