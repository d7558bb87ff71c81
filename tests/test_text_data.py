"""From raw text to an assistant: plain-text data, nanoGPT's split, training on it, and --init-from."""

from pathlib import Path

import numpy as np
import pytest
import torch

import tinylm.data.text as text_module
from tinylm import checkpoint as ckpt
from tinylm.cli import main
from tinylm.config import apply_overrides
from tinylm.data.prepare import prepare_data
from tinylm.data.sources import DataError
from tinylm.data.text import split_documents, token_stream
from tinylm.tokenizer import ByteTokenizer, build_tokenizer
from tinylm.train import build_training, plan_run, train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"tiny Shakespeare absent: {SHAKESPEARE}"
)
EOS = ByteTokenizer.eos_id


def text_config(make_config, source, **data):
    return apply_overrides(make_config(), {"data.source": str(source), **data})


@needs_shakespeare
def test_tiny_shakespeare_with_gpt2_splits_exactly_as_nanogpt(make_config, gpt2_ranks):
    config = text_config(make_config, SHAKESPEARE, tokenizer="gpt2", gpt2_ranks_path=str(gpt2_ranks))
    data = prepare_data(config)
    # nanoGPT's data/shakespeare/prepare.py: 301,966 training and 36,059 validation tokens (+ end-of-text).
    assert len(data.train.tokens) == 301_966 + 1 and len(data.val.tokens) == 36_059 + 1
    assert data.train.tokens[-1] == data.tokenizer.eos_id
    assert data.tokenizer.decode(data.train.tokens[:4].tolist()) == "First Citizen:\n"
    assert len(data.train) == 301_966 // 64 and data.is_text


@needs_shakespeare
def test_long_text_is_tokenized_in_pieces_without_changing_a_token(gpt2_ranks):
    gpt2 = build_tokenizer("gpt2", gpt2_ranks_path=str(gpt2_ranks))
    text = SHAKESPEARE.read_text()[:200_000]
    whole = token_stream(gpt2, [text], piece_size=10**9)
    done = []
    pieces = token_stream(gpt2, [text], piece_size=3_000, progress=done.append)
    assert np.array_equal(whole, pieces)
    assert sum(done) == len(text) and len(done) > 50


@needs_shakespeare
def test_validation_is_the_last_tenth_of_the_characters(make_config):
    data = prepare_data(text_config(make_config, SHAKESPEARE))
    text = SHAKESPEARE.read_text()
    cut = int(len(text) * 0.9)
    assert bytes(data.val.tokens[:-1].tolist()).decode() == text[cut:]
    assert bytes(data.train.tokens[:-1].tolist()).decode() == text[:cut]


def test_a_folder_of_text_files_joins_documents_with_end_of_text(tmp_path, make_config):
    (tmp_path / "b.txt").write_text("second document " * 10)
    (tmp_path / "a.txt").write_text("first document " * 10)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "c.txt").write_text("third document " * 10)
    (tmp_path / "notes.md").write_text("not text data")
    data = prepare_data(text_config(make_config, tmp_path, max_seq_length=16, val_fraction=0.2))
    stream = bytes(t for t in [*data.train.tokens, *data.val.tokens] if t != EOS).decode()
    assert stream == "first document " * 10 + "second document " * 10 + "third document " * 10
    # After a.txt, after b.txt, and after the part of c.txt before the cut (files in path order).
    train_ends = np.flatnonzero(np.asarray(data.train.tokens) == EOS).tolist()
    assert train_ends == [150, 150 + 1 + 160, len(data.train.tokens) - 1]
    assert data.val.tokens[-1] == EOS


def test_split_documents_cuts_inside_the_document_that_holds_the_boundary():
    assert split_documents(["aaaa", "bbbbbb"], val_fraction=0.3) == (["aaaa", "bbb"], ["bbb"])
    assert split_documents(["aaaaaaaaaa"], val_fraction=0.1) == (["aaaaaaaaa"], ["a"])


def test_hub_text_data_set_uses_the_chosen_config_split_and_field(make_config, monkeypatch):
    datasets = pytest.importorskip("datasets")
    asked = []

    def fake_hub(name, config=None, split="train"):
        asked.append((name, config, split))
        return datasets.Dataset.from_dict({"id": [1, 2], "content": ["hello world " * 20, "bye now " * 20]})

    monkeypatch.setattr(text_module, "hub_dataset", fake_hub)
    config = text_config(
        make_config, "hf:someone/corpus", hf_config="en", hf_split="validation", text_field="content"
    )
    data = prepare_data(apply_overrides(config, {"max_seq_length": 16}))
    assert asked[0] == ("someone/corpus", "en", "validation")
    assert bytes(data.train.tokens[:11].tolist()) == b"hello world"
    with pytest.raises(
        DataError, match=r"hf:someone/corpus: no field 'text' \(it has id, content\).*text_field"
    ):
        prepare_data(apply_overrides(config, {"text_field": "text", "max_seq_length": 8}))


def test_text_problems_are_one_line_naming_the_file(tmp_path, make_config):
    with pytest.raises(DataError, match=r"missing\.txt does not exist"):
        prepare_data(text_config(make_config, tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"holds no \.txt files"):
        prepare_data(text_config(make_config, tmp_path))
    (tmp_path / "short.txt").write_text("too short " * 30)
    with pytest.raises(DataError, match=r"the last 10% of the text is 31 tokens, less than one window of"):
        prepare_data(text_config(make_config, tmp_path / "short.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 100)
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text"):
        prepare_data(text_config(make_config, tmp_path / "latin1.txt"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text()[:60_000]
    else:  # the same kind of text, generated: the test still trains on a .txt file
        rng = np.random.default_rng(0)
        words = ["the", "king", "shall", "speak", "and", "all", "men", "hear", "my", "lord"]
        text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(6000))
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, make_config, text_file):
    """Stage one of the recipe: pretrain on plain text."""
    run_dir = tmp_path_factory.mktemp("pretrain")
    config = apply_overrides(make_config(max_steps=40, eval_interval=20), {"data.source": str(text_file)})
    result = train(config, out_dir=run_dir, progress_bar=False)
    return run_dir, result


def test_training_on_text_learns_and_samples_continue_the_held_out_text(pretrained):
    run_dir, result = pretrained
    from tinylm.tracking import read_metrics

    lines = read_metrics(run_dir)
    losses = [m["loss"] for m in lines if "loss" in m]
    evals = [m for m in lines if "val_loss" in m]
    assert losses[-1] < losses[0] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert result.best_val_loss == min(m["val_loss"] for m in evals)
    assert all(len(s["prompt"]) == 16 and s["completion"] for s in evals[-1]["samples"])


def test_init_from_starts_a_new_run_from_the_weights_and_tokenizer(
    pretrained, tmp_path, tiny_set_args, capsys
):
    run_dir, _ = pretrained
    source = ckpt.load_model(run_dir / ckpt.BEST)
    finetune = tmp_path / "finetune"
    # Stage two: fine-tune on instructions. The tokenizer is the checkpoint's, whatever the config says.
    args = ["train", "--quiet", *tiny_set_args, "--set", "max_steps=2", "--set", "tokenizer=bpe"]
    assert (
        main([*args, "--data", "synthetic", "--init-from", str(run_dir / ckpt.BEST), "--out", str(finetune)])
        == 0
    )
    assert f"starting from the weights and tokenizer of {run_dir / ckpt.BEST}" in capsys.readouterr().out
    # The step-0 checkpoint is the pretrained model, with a fresh optimizer and schedule.
    _, start = ckpt.read_checkpoint(finetune / ckpt.LATEST)
    tuned = ckpt.load_model(finetune / ckpt.LATEST)
    assert tuned.tokenizer.to_dict() == source.tokenizer.to_dict()
    assert tuned.config.model == source.config.model
    assert tuned.config.data.source == "synthetic" and tuned.info["step"] == 2
    assert start["train_state"]["schedule"]["total_steps"] == 2
    assert start["train_state"]["watch"]["best_loss"] is not None  # its own validation, on the new data


def test_init_from_weights_are_the_starting_point(pretrained, tmp_path, make_config):
    run_dir, _ = pretrained
    source = ckpt.load_model(run_dir / ckpt.BEST)
    plan = plan_run(make_config(max_steps=1), out_dir=tmp_path, init_from=run_dir / ckpt.BEST)
    run = build_training(plan.config, device=plan.device, start=plan.start)
    for name, weight in source.model.state_dict().items():
        assert torch.equal(run.state.model.state_dict()[name], weight), name
    assert run.state.optimizer.state_dict()["state"] == {}  # a fresh optimizer
    assert run.state.schedule(0) == run.config.train.learning_rate / run.config.train.warmup_steps


def test_eval_command_measures_a_text_model_on_its_held_out_text(pretrained, capsys):
    from tinylm.evaluate import held_out

    run_dir, _ = pretrained
    loaded = ckpt.load_model(run_dir / ckpt.BEST)
    val = prepare_data(loaded.config, tokenizer=loaded.tokenizer).val
    tokenizer = loaded.tokenizer
    expected = held_out(
        loaded.model, val, batch_size=16, pad_id=tokenizer.eos_id, byte_lengths=tokenizer.byte_lengths()
    )
    assert main(["eval", "--checkpoint", str(run_dir / ckpt.BEST), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert (
        f"validation on {len(val)} held-out windows of {loaded.config.data.source}: loss {expected.loss:.4f}, "
        f"perplexity {expected.perplexity:.2f}, bits per byte {expected.bits_per_byte:.4f}"
    ) in out
