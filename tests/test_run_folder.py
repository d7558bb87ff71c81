"""One writer per run folder: a second run or resume into a folder in use fails at once naming the holder and
writes nothing; a lock left by a process that ended is taken over with a note; readers never need it."""

import logging
import os
import subprocess
import sys
import time

import pytest

from tinylm import checkpoint as ckpt
from tinylm.cli import main
from tinylm.run_folder import LOCK_FILE, RunFolder, RunFolderError
from tinylm.train import train


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_folder_in_use_refuses_a_second_run_and_a_resume(tmp_path, make_config, tiny_set_args, capsys):
    train(make_config(max_steps=2), out_dir=tmp_path, progress_bar=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    holder = RunFolder(tmp_path)
    holder.lock()  # as a training process would hold it
    try:
        args = ["train", *tiny_set_args, "--quiet", "--data", "synthetic", "--set", "max_steps=3"]
        for attempt in ([*args, "--out", str(tmp_path), "--overwrite"], ["train", "--resume", str(tmp_path)]):
            assert main(attempt) == 2
            line = one_error_line(capsys)
            assert f"{tmp_path} is in use by process {os.getpid()} on " in line and "another --out" in line
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != LOCK_FILE} == {
            k: v for k, v in before.items() if k != LOCK_FILE
        }
        # Readers need no lock.
        assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--max-tokens", "2"]) == 0
    finally:
        holder.unlock()
    assert train(make_config(max_steps=3), resume=tmp_path, progress_bar=False).step == 3


def test_a_lock_left_by_a_process_that_ended_is_taken_over_with_a_note(tmp_path, make_config, caplog):
    (tmp_path / LOCK_FILE).write_text("process 4242 on elsewhere (since 2026-01-01 00:00:00)\n")
    with caplog.at_level(logging.INFO, logger="tinylm"):
        train(make_config(max_steps=1), out_dir=tmp_path, progress_bar=False)
    assert "left locked by process 4242 on elsewhere" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released cleanly at the end


def test_a_killed_run_leaves_the_folder_free(tmp_path, repo_root, offline_env, tiny_set_args):
    """The operating system drops the lock of a process that dies, so the folder is never stuck."""
    out = tmp_path / "run"
    args = [*tiny_set_args, "--quiet", "--data", "synthetic", "--set", "max_steps=100000", "--out", str(out)]
    child = subprocess.Popen(
        [sys.executable, "-m", "tinylm", "train", *args],
        cwd=repo_root,
        env=offline_env,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / ckpt.LATEST).exists():
            assert time.monotonic() < deadline and child.poll() is None, "the child did not start training"
            time.sleep(0.05)
        with pytest.raises(RunFolderError, match=rf"is in use by process {child.pid} on "):
            RunFolder(out).lock()
    finally:
        child.kill()
        child.wait()
    folder = RunFolder(out)
    folder.lock()
    folder.unlock()
