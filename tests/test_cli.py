"""The commands users type: the seed's scripts work end to end, and every bad input ends in one `error:` line.

Most cases run `tinylm.cli.main(argv)` in-process (fast); the seed's own commands run as subprocesses.
"""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tinylm.cli import main
from tinylm.prompts import TEMPLATE, chat_prompt_budget
from tinylm.tokenizer import ByteTokenizer

QUESTION = "What is 2 plus 3?"


def run(args: list[str], root: Path, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=root, env=env, input=stdin, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, repo_root, offline_env, tiny_set_args) -> Path:
    """One tiny run through the seed's `python train.py`, shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("cli") / "run"
    seed_command = ["train.py", "--preset", "demo", "--data", "synthetic", "--set", "max_steps=3"]
    done = run([*seed_command, *tiny_set_args, "--out", str(out)], repo_root, offline_env)
    assert done.returncode == 0, done.stderr
    assert "done at step 3" in done.stdout
    assert (out / "best_model.pt").is_file() and (out / "latest.pt").is_file()
    return out


def error_line(capsys) -> str:
    """The single line a user error leaves on stderr."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    written = [p.name for p in out.rglob("*") if p.suffix in (".pt", ".tmp")] if out.exists() else []
    assert not written, written


# -- the seed's commands, as subprocesses -------------------------------------------------------------


def test_inference_prints_the_same_answer_as_json(trained, repo_root, offline_env):
    base = ["inference.py", "--checkpoint", str(trained / "best_model.pt"), "--prompt", QUESTION]
    with ThreadPoolExecutor(2) as pool:  # two interpreters at once: half the wall time
        plain, as_json = pool.map(
            lambda extra: run([*base, "--max-tokens", "5", *extra], repo_root, offline_env), [[], ["--json"]]
        )
    assert plain.returncode == 0, plain.stderr
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert set(result) == {"text", "finish_reason", "prompt_tokens", "completion_tokens", "tokens_per_sec"}
    assert result["finish_reason"] in ("stop", "length")
    assert 1 <= result["completion_tokens"] <= 5
    assert result["prompt_tokens"] == len(f"### Instruction:\n{QUESTION}\n\n### Response:\n".encode())
    assert result["tokens_per_sec"] >= 0
    assert result["text"]  # something was printed
    assert plain.stdout == result["text"] + "\n"  # the demo preset decodes greedily: same answer both ways


def test_chat_with_scripted_input(trained, repo_root, offline_env):
    script = "hello\n/set temperature 0\n/help\n/settings\n/reset\n/exit\n"
    done = run(
        ["inference.py", "--checkpoint", str(trained), "--chat", "--max-tokens", "4", "--temperature", "0.9"],
        repo_root,
        offline_env,
        stdin=script,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "tinylm chat:" in out
    assert "temperature=0.9" not in out.split("[temperature = 0.0]")[1]  # /set took effect before /settings
    assert "[temperature = 0.0]" in out
    assert "/reset" in out and "/set NAME VALUE" in out  # the help text
    assert "temperature=0.0" in out  # /settings shows the change
    assert "[conversation cleared]" in out
    assert out.rstrip().endswith("bye")


def test_python_m_tinylm_help_is_quick(repo_root, offline_env):
    started = time.perf_counter()
    done = run(["-m", "tinylm", "--help"], repo_root, offline_env)
    assert done.returncode == 0
    assert "train" in done.stdout and "generate" in done.stdout
    assert time.perf_counter() - started < 10


# -- generation in-process --------------------------------------------------------------------------


def test_a_seed_makes_a_sampled_answer_reproducible(trained, capsys):
    args = ["generate", "--checkpoint", str(trained), "--prompt", QUESTION, "--json", "--max-tokens", "6"]
    sampled = [*args, "--temperature", "1.0", "--top-k", "0", "--seed", "3"]
    assert main(sampled) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(sampled) == 0
    assert json.loads(capsys.readouterr().out)["text"] == first["text"]


def test_bad_sampling_flag_names_the_field(trained, capsys):
    assert main(["generate", "--checkpoint", str(trained), "--prompt", QUESTION, "--top-p", "0"]) == 2
    assert "sampling.top_p" in error_line(capsys)
    argv = ["generate", "--checkpoint", str(trained), "--prompt", QUESTION, "--repetition-penalty", "1e-40"]
    assert main(argv) == 2
    assert "sampling.repetition_penalty = 1e-40 must be between 0.01 and 100" in error_line(capsys)


def test_sampling_flags_at_their_limits_answer(scripted_run, capsys):
    checkpoint = str(scripted_run.folder / "best_model.pt")
    argv = ["generate", "--checkpoint", checkpoint, "--prompt", "hi", "--json", "--temperature", "1e-40"]
    assert main([*argv, "--max-tokens", "1000000000000"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == scripted_run.answer


# -- bad input: one line, exit status 2, nothing half-written ------------------------------------------


def train_argv(out: Path, *extra: str) -> list[str]:
    short = ["--set", "max_steps=2", "--set", "log_interval=1"]
    return ["train", "--preset", "demo", "--out", str(out), *short, *extra]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("absent.jsonl", None, "data file {path} does not exist"),
        ("folder.jsonl", "DIR", "data file {path} is a folder, not a file"),
        ("latin1.jsonl", b'{"instruction": "caf\xe9", "response": "x"}\n', "{path}: not UTF-8 text"),
        (
            "broken.jsonl",
            '{"instruction": "a", "response": "b"}\n{"instruction": \n',
            "{path}:2: malformed JSON",
        ),
        ("partial.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n', "{path}:2: "),
        (
            "empty.jsonl",
            '{"instruction": "a", "response": " "}\n{"instruction": "b", "response": ""}\n',
            "{path}",
        ),
        ("numbers.jsonl", '{"instruction": "a", "response": 5}\n', "{path}:1: field response must be text"),
        ("notes.txt", "hello", "{path}"),
    ],
)
def test_bad_data_files(tmp_path, capsys, tiny_set_args, name, content, expected):
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    assert main(train_argv(out, "--data", str(path), *tiny_set_args)) == 2
    line = error_line(capsys)
    assert expected.format(path=path) in line
    if name == "partial.jsonl":
        assert "missing field(s) response" in line
    if name == "empty.jsonl":
        assert "no usable records" in line
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("n_heads=5", "model.n_heads = 5 must divide model.d_model (192 is not divisible by 5)"),
        ("bogus=1", "unknown config field 'bogus'"),
        ("learning_rate=-0.1", "train.learning_rate"),
        ("epochs=0", "train.epochs"),
        ("d_model=wide", "model.d_model wants int"),
    ],
)
def test_impossible_config_values(tmp_path, capsys, setting, expected):
    out = tmp_path / "out"
    # No preset: the v2 defaults (d_model 192).
    assert main(["train", "--data", "synthetic", "--out", str(out), "--set", setting]) == 2
    assert expected in error_line(capsys)
    assert_nothing_written(out)


def test_bad_config_file_names_it(tmp_path, capsys):
    config = tmp_path / "mine.toml"
    config.write_text("[model]\nd_model = 64\nn_heads = 3\n")
    assert main(["train", "--config", str(config), "--data", "synthetic", "--out", str(tmp_path / "o")]) == 2
    assert "model.n_heads" in error_line(capsys)


def test_unreachable_hub_fails_fast_pointing_at_synthetic(tmp_path, capsys):
    started = time.perf_counter()
    assert main(["train", "--data", "some/name", "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 30
    line = error_line(capsys)
    assert "'some/name'" in line and "--data synthetic" in line
    assert_nothing_written(tmp_path / "out")


@pytest.fixture
def real_checkpoint(trained) -> Path:
    return trained / "best_model.pt"


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign", "folder without checkpoints"])
def test_bad_checkpoints(tmp_path, capsys, real_checkpoint, kind):
    path = tmp_path / "model.pt"
    if kind == "truncated":
        data = real_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        torch.save({"a": 1}, path)
    elif kind == "folder without checkpoints":
        path = tmp_path
    assert main(["generate", "--checkpoint", str(path), "--prompt", QUESTION]) == 2
    line = error_line(capsys)
    assert str(path) in line
    expected = {
        "missing": "does not exist",
        "truncated": "truncated",
        "foreign": "not a tinylm checkpoint",
        "folder without checkpoints": "holds no best_model.pt or latest.pt",
    }[kind]
    assert expected in line


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(capsys, real_checkpoint, prompt):
    assert main(["generate", "--checkpoint", str(real_checkpoint), "--prompt", prompt]) == 2
    assert "--prompt is empty" in error_line(capsys)


# -- run folders: protection, overwrite, resume -----------------------------------------------------


def metric_steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_training_into_an_existing_run_needs_resume_or_overwrite(tmp_path, capsys, tiny_set_args):
    out = tmp_path / "run"
    argv = train_argv(out, "--data", "synthetic", *tiny_set_args)
    assert main(argv) == 0
    capsys.readouterr()
    before = (out / "latest.pt").read_bytes()
    assert main(argv) == 2
    line = error_line(capsys)
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert (out / "latest.pt").read_bytes() == before  # refused before touching anything
    assert main([*argv, "--overwrite", "--set", "max_steps=3"]) == 0
    assert metric_steps(out) == [1, 2, 3]


def test_resume_continues_a_run_folder(tmp_path, capsys, tiny_set_args):
    out = tmp_path / "run"
    assert main(train_argv(out, "--data", "synthetic", *tiny_set_args)) == 0
    assert main(["train", "--resume", str(out), "--set", "max_steps=4"]) == 0
    assert "done at step 4" in capsys.readouterr().out
    assert metric_steps(out) == [1, 2, 3, 4]


def test_resume_from_a_named_checkpoint_starts_at_its_step(tmp_path, capsys, tiny_set_args):
    out = tmp_path / "run"
    argv = train_argv(
        out, "--data", "synthetic", *tiny_set_args, "--set", "max_steps=4", "--set", "save_interval=2"
    )
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "checkpoint_step_2.pt")]) == 0
    assert "resuming from step 2 of 4" in capsys.readouterr().out


def test_resume_of_a_folder_without_a_run_fails_in_one_line(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert str(tmp_path) in error_line(capsys)


def test_generate_command_says_it_cut_a_long_prompt(scripted_run, capsys):
    checkpoint = str(scripted_run.folder / "best_model.pt")  # byte-level, 256-token window
    long_context = "a long passage " * 40
    argv = ["generate", "--checkpoint", checkpoint, "--prompt", "Sum up.", "--context", long_context]
    assert main([*argv, "--max-tokens", "100", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert list(result) == ["text", "finish_reason", "prompt_tokens", "completion_tokens", "tokens_per_sec"]
    assert result["text"] == scripted_run.answer and result["finish_reason"] == "stop"
    assert result["prompt_tokens"] == chat_prompt_budget(256, 100) == 156
    whole = len(TEMPLATE.encode_prompt(ByteTokenizer(), "Sum up.", long_context))
    assert f"the prompt has {whole} tokens; cut to 156" in err

    assert main([*argv[:-2], "--max-tokens", "100", "--json"]) == 0  # a prompt that fits: no note
    assert capsys.readouterr().err == ""


def test_eval_on_synthetic_data_reports_bits_per_byte_and_exact_match_per_task_and_turn(
    tmp_path, capsys, tiny_set_args
):
    out = tmp_path / "run"
    more = ["--set", "dataset_size=200", "--set", "val_fraction=0.1", "--set", "max_steps=2"]
    assert main(["train", "--quiet", "--data", "synthetic", *tiny_set_args, *more, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--device", "cpu", "--show", "0"]) == 0
    printed = capsys.readouterr().out
    assert "held-out records of synthetic: loss " in printed and ", bits per byte " in printed
    assert "exact match per task and turn:" in printed
    for task, turn in (
        ("add", 1),
        ("add_then_subtract", 1),
        ("add_then_subtract", 2),
        ("sort_then_reverse", 2),
    ):
        assert f"  {task:<20} turn {turn}  " in printed
    assert "\nturn 1: " in printed and "\nturn 2: " in printed
    assert "exact-match accuracy: " in printed
