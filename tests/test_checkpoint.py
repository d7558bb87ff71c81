"""Checkpoints: a bit-exact round trip that rebuilds model and tokenizer alone; clear errors for bad files."""

import pytest
import torch

from tinylm.checkpoint import BEST, LATEST, CheckpointError, load_model, read_checkpoint, save_checkpoint
from tinylm.config import ConfigError, apply_overrides
from tinylm.model import TinyLM
from tinylm.tokenizer import ByteTokenizer, build_tokenizer

TEXTS = [
    "### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n5",
    "Reverse the order of the words in the passage: red blue green",
    "emoji 😀 and 中文 and <|endoftext|> as text",
]


def build_model(config, vocab_size: int, *, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(apply_overrides(config, {"vocab_size": vocab_size}).model)


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_gives_bit_identical_logits(tmp_path, tiny_config, tied):
    config = apply_overrides(tiny_config, {"tie_weights": tied, "dropout": 0.1})
    tokenizer = ByteTokenizer()
    model = build_model(config, tokenizer.vocab_size).eval()
    path = save_checkpoint(
        tmp_path / "model.pt", model=model, config=config, tokenizer=tokenizer, step=7, info={"note": "x"}
    )
    loaded = load_model(path)
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    assert not loaded.model.training
    assert loaded.config == config
    assert loaded.info == {"note": "x", "step": 7}
    assert loaded.model.num_parameters() == model.num_parameters()
    assert (loaded.model.head.weight is loaded.model.embed.weight) is tied
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_bpe_tokenizer_travels_inside_the_checkpoint(tmp_path, tiny_config):
    tokenizer = build_tokenizer("bpe", texts=TEXTS * 10, vocab_size=300)
    config = apply_overrides(
        tiny_config, {"tokenizer": "bpe", "bpe_vocab_size": 300, "vocab_size": tokenizer.vocab_size}
    )
    model = build_model(config, tokenizer.vocab_size)
    loaded = load_model(
        save_checkpoint(tmp_path / "bpe.pt", model=model, config=config, tokenizer=tokenizer, step=0)
    )
    assert loaded.tokenizer.kind == "bpe"
    assert loaded.tokenizer.eos_id == tokenizer.eos_id
    assert loaded.tokenizer.vocab_size == tokenizer.vocab_size == loaded.config.model.vocab_size
    for text in [*TEXTS, "words the tokenizer never saw: zyzzyva"]:
        assert loaded.tokenizer.encode(text) == tokenizer.encode(text)
        assert loaded.tokenizer.decode(tokenizer.encode(text)) == text


def test_gpt2_tokenizer_travels_inside_the_checkpoint(tmp_path, tiny_config, gpt2_ranks, monkeypatch):
    tokenizer = build_tokenizer("gpt2", gpt2_ranks_path=str(gpt2_ranks))
    config = apply_overrides(
        tiny_config,
        {"tokenizer": "gpt2", "vocab_size": tokenizer.vocab_size},
    )
    model = build_model(config, tokenizer.vocab_size)
    path = save_checkpoint(tmp_path / "gpt2.pt", model=model, config=config, tokenizer=tokenizer, step=0)
    # Loading must need neither the ranks file nor tiktoken's download.
    monkeypatch.delenv("TINYLM_GPT2_TIKTOKEN", raising=False)
    monkeypatch.setattr("tinylm.tokenizer.tiktoken.get_encoding", None)
    loaded = load_model(path)
    assert loaded.tokenizer.encode("Hello world") == [15496, 995]
    assert loaded.tokenizer.eos_id == 50256
    for text in TEXTS:
        assert loaded.tokenizer.encode(text) == tokenizer.encode(text)


def test_a_run_folder_resolves_to_its_best_then_latest_checkpoint(tmp_path, tiny_config):
    tokenizer = ByteTokenizer()
    model = build_model(tiny_config, tokenizer.vocab_size)
    save_checkpoint(tmp_path / LATEST, model=model, config=tiny_config, tokenizer=tokenizer, step=5)
    assert load_model(tmp_path).path == tmp_path / LATEST
    save_checkpoint(tmp_path / BEST, model=model, config=tiny_config, tokenizer=tokenizer, step=3)
    assert load_model(tmp_path).info["step"] == 3


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.pt does not exist"):
        load_model(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match=r"holds no best_model\.pt or latest\.pt"):
        load_model(tmp_path)


def test_truncated_checkpoint_is_reported_as_such(tmp_path, tiny_config):
    tokenizer = ByteTokenizer()
    model = build_model(tiny_config, tokenizer.vocab_size)
    whole = save_checkpoint(
        tmp_path / "whole.pt", model=model, config=tiny_config, tokenizer=tokenizer, step=1
    )
    half = tmp_path / "half.pt"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"half\.pt: not a readable checkpoint \(truncated"):
        load_model(half)


@pytest.mark.parametrize("payload", [{"a": 1}, [1, 2, 3], {"format": "other"}])
def test_a_file_that_is_not_a_tinylm_checkpoint_is_refused(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"other\.pt: not a tinylm checkpoint"):
        read_checkpoint(path)


def test_a_newer_format_version_is_refused(tmp_path, tiny_config):
    tokenizer = ByteTokenizer()
    model = build_model(tiny_config, tokenizer.vocab_size)
    path = save_checkpoint(tmp_path / "m.pt", model=model, config=tiny_config, tokenizer=tokenizer, step=1)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "version": 99}, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_config):
    tokenizer = ByteTokenizer()
    model = build_model(tiny_config, tokenizer.vocab_size)
    wider = apply_overrides(tiny_config, {"d_model": 64})
    path = save_checkpoint(tmp_path / "m.pt", model=model, config=wider, tokenizer=tokenizer, step=1)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(path)


def test_an_impossible_saved_config_is_refused_naming_the_field(tmp_path, tiny_config):
    tokenizer = ByteTokenizer()
    model = build_model(tiny_config, tokenizer.vocab_size)
    path = save_checkpoint(tmp_path / "m.pt", model=model, config=tiny_config, tokenizer=tokenizer, step=1)
    payload = torch.load(path, weights_only=True)
    payload["config"]["model"]["n_heads"] = 5
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"model\.n_heads"):
        load_model(path)
    assert issubclass(CheckpointError, RuntimeError) and not issubclass(CheckpointError, ConfigError)


def damage_the_middle(path) -> None:
    """Zero 4 KB in the middle of the file, as a bad disk or a broken copy would."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_damaged_record(tmp_path, tiny_config):
    tokenizer = ByteTokenizer()
    model = build_model(tiny_config, tokenizer.vocab_size)
    path = save_checkpoint(tmp_path / "m.pt", model=model, config=tiny_config, tokenizer=tokenizer, step=1)
    damage_the_middle(path)
    with pytest.raises(CheckpointError, match=r"m\.pt: damaged: its record .* fails its checksum"):
        load_model(path)


def test_resume_of_a_damaged_latest_names_the_intact_checkpoint_and_uses_it_only_when_asked(
    tmp_path, capsys, tiny_set_args
):
    from tinylm.cli import main

    args = ["train", *tiny_set_args, "--quiet", "--data", "synthetic", "--set", "save_interval=2"]
    assert main([*args, "--set", "max_steps=4", "--out", str(tmp_path)]) == 0
    damage_the_middle(tmp_path / "latest.pt")
    damage_the_middle(tmp_path / "checkpoint_step_4.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path), "--set", "max_steps=6"]) == 2
    line = capsys.readouterr().err.strip()
    intact = tmp_path / "checkpoint_step_2.pt"
    assert line.startswith(f"error: {tmp_path / 'latest.pt'}: damaged") and f"--resume {intact}" in line
    assert main(["train", "--resume", str(intact), "--set", "max_steps=6"]) == 0
    assert read_checkpoint(tmp_path / "latest.pt")[1]["step"] == 6
