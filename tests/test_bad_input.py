"""Bad input and a hostile environment end in one `error:` line, a non-zero exit and nothing half-written."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tinylm import checkpoint as ckpt
from tinylm.cli import main


def exit_code(argv: list[str]) -> int:
    """main's return code, or the code of the SystemExit that argparse raises for a bad argument."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    assert not any("Traceback" in line for line in lines), lines
    return lines[-1]


@pytest.fixture
def train_args(tiny_set_args):
    return ["train", *tiny_set_args, "--quiet", "--data", "synthetic", "--set", "max_steps=2"]


def test_an_out_that_is_a_file(tmp_path, train_args, capsys):
    (tmp_path / "file").write_text("mine")
    assert exit_code([*train_args, "--out", str(tmp_path / "file")]) == 2
    line = one_error_line(capsys)
    assert line == f"error: --out {tmp_path / 'file'}: cannot write a run there (it is a file, not a folder)"
    assert (tmp_path / "file").read_text() == "mine"


def test_a_cache_that_cannot_be_written(tmp_path, train_args, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "file" / "cache"))
    assert exit_code([*train_args, "--out", str(tmp_path / "run")]) == 2
    assert "TINYLM_CACHE to a writable folder" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["serve", "--checkpoint", "x", "--port", "99999"],
            "--port: 99999 is not a port number (0 to 65535)",
        ),
        (["ui", "--checkpoint", "x", "--port", "-1"], "--port: -1 is not a port number"),
        (
            ["generate", "--checkpoint", "x", "--prompt", "hi", "--seed", "1e23"],
            "--seed: '1e23' is not a whole",
        ),
        (["train", "--set", "seed=1e23"], "train.seed"),
    ],
)
def test_numbers_out_of_range(argv, expected, capsys):
    assert exit_code(argv) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"config": None}, "damaged config or tokenizer"),
        ({"config": [1, 2]}, "damaged config or tokenizer"),
        ({"step": "many"}, "damaged: its step is 'many', not a whole number"),
    ],
)
def test_checkpoints_with_damaged_fields(scripted_run, tmp_path, capsys, change, expected):
    payload = torch.load(scripted_run.folder / ckpt.BEST, weights_only=True)
    payload.update(change)
    if change.get("config", 0) is None:
        del payload["config"]
    torch.save(payload, tmp_path / "bad.pt")
    for command in (["generate", "--prompt", "hi"], ["eval"]):
        assert exit_code([command[0], "--checkpoint", str(tmp_path / "bad.pt"), *command[1:]]) == 2
        assert expected in one_error_line(capsys)


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KB tmpfs: room for a tiny run's config but not for its first checkpoint."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_partial_file(small_disk, tiny_set_args, capsys):
    out = small_disk / "run"
    args = [
        "train",
        *tiny_set_args,
        "--quiet",
        "--data",
        "synthetic",
        "--set",
        "d_model=128",
        "--set",
        "d_ff=256",
    ]
    assert exit_code([*args, "--set", "max_steps=2", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {out / 'latest.pt'}: could not be written: ") and "disk" in line
    assert not [p for p in Path(out).iterdir() if p.suffix in (".pt", ".tmp")]


def test_a_csv_field_longer_than_pythons_default_limit_is_read(tmp_path):
    from tinylm.data.sources import read_local

    context = "word " * 40_000  # 200,000 characters, over csv's default 131,072
    path = tmp_path / "long.csv"
    path.write_text(f'instruction,context,response\nSummarise.,"{context}",Short.\n', encoding="utf-8")
    (record,) = read_local(path)
    assert record.context == context and record.response == "Short."


def test_a_malformed_csv_names_its_line(tmp_path, capsys, tiny_set_args):
    path = tmp_path / "bad.csv"
    path.write_text('instruction,response\nfine,yes\n"unclosed,no\n', encoding="utf-8")
    args = ["train", *tiny_set_args, "--quiet", "--data", str(path), "--out", str(tmp_path / "run")]
    assert exit_code(args) == 2
    assert f"{path}:" in one_error_line(capsys)
