"""Every architecture goes the whole way: trains from the command line, resumes bit for bit, and answers in
`tinylm generate`, the terminal chat and the HTTP API."""

import io
import json

import pytest
from fastapi.testclient import TestClient

from tinylm.chat import ChatSession, run_chat
from tinylm.checkpoint import load_model
from tinylm.cli import main
from tinylm.server import create_app

ARCHITECTURES = {"gpt2": ["--set", "arch=gpt2"], "llama": ["--set", "arch=llama", "--set", "n_kv_heads=1"]}


def losses(run) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"]) for m in lines if "loss" in m]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trains_resumes_and_answers_everywhere(arch, tmp_path, tiny_set_args, capsys):
    args = ["train", *tiny_set_args, *ARCHITECTURES[arch], "--quiet", "--data", "synthetic"]
    args += ["--set", "dropout=0.1", "--set", "save_interval=2", "--set", "log_interval=1"]
    assert main([*args, "--set", "max_steps=4", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--set", "max_steps=4", "--out", str(tmp_path / "cut")]) == 0
    assert main(["train", "--resume", str(tmp_path / "cut" / "checkpoint_step_2.pt"), "--quiet"]) == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # resumed bit for bit, dropout included

    checkpoint = tmp_path / "whole" / "best_model.pt"
    loaded = load_model(checkpoint)
    assert loaded.config.model.arch == arch
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "What is 2 plus 3?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completion_tokens"] > 0

    out = io.StringIO()
    assert (
        run_chat(ChatSession(loaded, loaded.config.sampling), stdin=io.StringIO("hello\n/exit\n"), stdout=out)
        == 0
    )
    assert "tokens/s" in out.getvalue()

    with TestClient(create_app(loaded)) as client:  # runs the app's lifespan: its generation worker
        body = {"model": "whole", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0
