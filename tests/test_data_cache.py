"""Tokenized data is cached on disk: built once, memory-mapped after, rebuilt when its inputs change."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

import tinylm.data.prepare as prepare_module
from tinylm.config import apply_overrides
from tinylm.data.cache import META, VERSION, cache_root, digest, load_or_build
from tinylm.data.instructions import collate
from tinylm.data.prepare import prepare_data
from tinylm.data.tokens import TokenArrays
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import ByteTokenizer


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))


def count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def assert_same_data(a, b):
    for split in ("train", "val"):
        x, y = getattr(a, split), getattr(b, split)
        for part in ("tokens", "starts", "lengths", "mask"):
            assert np.array_equal(getattr(x, part), getattr(y, part)), (split, part)
    assert a.samples == b.samples


def test_second_prepare_opens_the_cache_without_tokenizing(make_config, monkeypatch):
    config = make_config()
    first = prepare_data(config)
    tokenized = count_calls(monkeypatch, prepare_module, "encode_records")
    second = prepare_data(config)
    assert tokenized == []
    assert second.key == first.key
    assert_same_data(first, second)
    assert isinstance(second.train.tokens, np.memmap) and second.train.tokens.dtype == np.uint16
    assert len(second.train) == 64 and len(second.val) > 0
    assert [s.text for s in second.samples] == [s.text for s in first.samples] and len(second.samples) == 3


def jsonl(path, n):
    records = [{"instruction": f"Say {i}.", "context": "", "response": f"{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cache_key_follows_the_data_tokenizer_template_options_and_window(tmp_path, make_config):
    data = jsonl(tmp_path / "records.jsonl", 40)
    config = apply_overrides(make_config(), {"data.source": str(data), "dataset_size": 30})
    base = prepare_data(config).key
    assert prepare_data(config).key == base
    changes = [{"max_seq_length": 32}, {"train_on_prompt": True}, {"tokenizer": "bpe", "bpe_vocab_size": 300}]
    keys = {prepare_data(apply_overrides(config, change)).key for change in changes}
    assert len(keys) == 3 and base not in keys
    jsonl(data, 41)  # an edited file (new size and modification time)
    assert prepare_data(config).key != base


def test_a_trained_bpe_tokenizer_is_cached_too(make_config, monkeypatch):
    config = apply_overrides(make_config(), {"tokenizer": "bpe", "bpe_vocab_size": 300})
    first = prepare_data(config)
    built = count_calls(monkeypatch, prepare_module, "build_tokenizer")
    second = prepare_data(config)
    assert built == []
    assert second.tokenizer.to_dict() == first.tokenizer.to_dict()
    assert_same_data(first, second)


def test_a_build_that_fails_leaves_nothing_that_looks_complete(make_config, monkeypatch):
    config = make_config()

    def broken_save(self, folder, name):
        raise OSError("disk full")

    monkeypatch.setattr(TokenArrays, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        prepare_data(config)
    assert list((cache_root() / "tokens").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("TINYLM_CACHE", str(cache_root()))
    assert len(prepare_data(config).train) == 64


def test_cache_lives_in_tinylm_cache_or_the_user_cache_folder(tmp_path, monkeypatch):
    assert cache_root() == tmp_path / "cache"
    monkeypatch.delenv("TINYLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "tinylm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "tinylm"


def test_batches_from_token_arrays_equal_the_collated_examples(tmp_path):
    tok = ByteTokenizer()
    examples = [
        TEMPLATE.encode_example(tok, instruction, "", response, max_seq_length=64)
        for instruction, response in (("Hi.", "yo"), ("Add 2 and 3.", "5"), ("Name a colour.", "blue"))
    ]
    arrays = TokenArrays.from_examples(examples, vocab_size=tok.vocab_size)
    arrays.save(tmp_path, "x")
    loaded = TokenArrays.load(tmp_path, "x")
    for order in ([0, 1, 2], [2, 0]):
        inputs, targets = loaded.batch(order, pad_id=tok.eos_id)
        expected_inputs, expected_targets = collate([examples[i] for i in order], tok.eos_id)
        assert inputs.equal(expected_inputs) and targets.equal(expected_targets)


def test_text_windows_share_their_boundary_token_and_every_target_counts():
    windows = TokenArrays.windows(np.arange(11, dtype=np.uint16), max_seq_length=3)
    assert len(windows) == 3  # 0-3, 3-6, 6-9; token 10 is left over
    inputs, targets = windows.batch([0, 2], pad_id=0)
    assert inputs.tolist() == [[0, 1, 2], [6, 7, 8]]
    assert targets.tolist() == [[1, 2, 3], [7, 8, 9]]


def test_an_entry_another_process_finished_first_is_kept_and_a_broken_one_replaced():
    def build_while_another_finishes(folder):
        # Another process (another machine's, on a shared cache) renames its entry into place meanwhile.
        (folder / "x.txt").write_text("ours")
        theirs = Path(tempfile.mkdtemp(dir=folder.parent))
        (theirs / "x.txt").write_text("theirs")
        (theirs / META).write_text(json.dumps({"key": {}, "meta": {}}))
        os.rename(theirs, folder.parent / folder.name.split(".")[1])
        return {}

    entry, _ = load_or_build("test", {"n": 1}, build_while_another_finishes)
    assert (entry / "x.txt").read_text() == "theirs"  # never removed, as they may be reading it
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # and ours is cleaned up

    def build(folder):
        (folder / "x.txt").write_text("whole")
        return {}

    broken = cache_root() / "test" / digest({"version": VERSION, "n": 2})[:32]
    broken.mkdir()  # the remains of an entry without meta.json
    (broken / "x.txt").write_text("half")
    entry, _ = load_or_build("test", {"n": 2}, build)
    assert entry == broken and (entry / "x.txt").read_text() == "whole"
