"""One-shot prompts too long for the window: how they are cut, and that the generate command says so."""

import json

import pytest

from tinylm.cli import main
from tinylm.prompts import (
    RESPONSE_HEADER,
    chat_prompt_budget,
    encode_prompt,
    fit_prompt,
)
from tinylm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


# -- a one-shot prompt too long for the window ---------------------------------------------------------


def test_fit_prompt_cuts_the_context_first_and_keeps_every_header():
    instruction, context = "Summarise this passage.", "word " * 200
    ids_, cut = fit_prompt(TOK, instruction, context, max_prompt_tokens=100)
    text = TOK.decode(ids_)
    assert len(ids_) == 100 and cut == len(encode_prompt(TOK, instruction, context)) - 100
    assert text.startswith(f"### Instruction:\n{instruction}\n\n### Context:\nword word")
    assert text.endswith(RESPONSE_HEADER)
    assert fit_prompt(TOK, instruction, max_prompt_tokens=100) == (encode_prompt(TOK, instruction), 0)


@pytest.mark.parametrize(("max_new", "budget"), [(10, 118), (64, 64), (100, 64)])
def test_prompt_budget_leaves_room_for_the_answer_but_at_least_half_the_window(max_new, budget):
    assert chat_prompt_budget(128, max_new) == budget


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
    whole = len(encode_prompt(TOK, "Sum up.", long_context))
    assert f"the prompt has {whole} tokens; cut to 156" in err

    assert main([*argv[:-2], "--max-tokens", "100", "--json"]) == 0  # a prompt that fits: no note
    assert capsys.readouterr().err == ""
