"""Hostile config files end in one short error line: alias bombs, non-text keys, non-UTF-8 bytes, huge values."""

import time

import pytest

from tinylm.config import ConfigError, load_config_file


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    lines.append("train: {learning_rate: *i}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_config_file(path)
    assert time.perf_counter() - started < 5  # generous: refusing takes milliseconds, expanding never ends
    message = str(error.value)
    assert message.startswith(f"{path}: aliases (*name) are not allowed") and len(message) < 300


@pytest.mark.parametrize(
    ("text", "shown"), [("1: 2\n", "got 1"), ("null: 2\n", "got None"), ("model:\n  3: 4\n", "got 3")]
)
def test_field_names_that_are_not_text(tmp_path, text, shown):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"field names .*must be text, {shown}"):
        load_config_file(path)


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("d_model = 64 # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text \(byte 18 is 0xe9\)"):
        load_config_file(path)


def test_a_huge_value_is_shown_cut_short(tmp_path):
    path = tmp_path / "long.toml"
    path.write_text(f'd_model = "{"9" * 100_000}"\n')
    with pytest.raises(ConfigError) as error:
        load_config_file(path)
    assert "model.d_model" in str(error.value) and len(str(error.value)) < 200
