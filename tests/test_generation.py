"""Generation past the context window, in batches, with the fast output layer, and for one-shot prompts.

tests/test_generate.py covers the basics (greedy is argmax, stop strings, seeds, the sampler); these cover
what a long answer, a batch of different lengths or a too-long prompt needs on top.
"""

import json
from dataclasses import replace

import pytest
import torch

from tinylm.cli import main
from tinylm.config import ModelConfig, SamplingConfig
from tinylm.generate import _TextTracker, generate_ids, next_token, stream, stream_batch
from tinylm.model import TinyLM
from tinylm.prompts import DEFAULT_STOP_STRINGS, TEMPLATE, chat_prompt_budget
from tinylm.tokenizer import ByteTokenizer, build_tokenizer

TOK = ByteTokenizer()
WINDOW = 16
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=50)  # 50 new tokens slide a 16-token window often


def small_window_model(seed: int = 0, **overrides) -> TinyLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=257, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_length=WINDOW, dropout=0.0
    )
    model = TinyLM(replace(config, **overrides)).eval()
    with torch.no_grad():  # weights far larger than the usual init, so answers vary instead of repeating
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model


def generated(model: TinyLM, prompts: list[list[int]], sampling=GREEDY, **options) -> list[list[int]]:
    return torch.stack(list(generate_ids(model, prompts, sampling, pad_id=TOK.eos_id, **options)), 1).tolist()


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# Lengths 1 to 40 around a 16-token window: rows slide at different steps, one starts past the window.
PROMPTS = [ids(n, seed=n) for n in (1, 5, 12, 40)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_rows_equal_each_prompt_alone_past_the_window(use_cache):
    model = small_window_model()
    together = generated(model, PROMPTS, use_cache=use_cache)
    alone = [generated(model, [p], use_cache=use_cache)[0] for p in PROMPTS]
    assert together == alone
    assert len({tuple(row) for row in together}) == len(PROMPTS)  # the rows really differ


def test_cached_equals_uncached_with_a_repetition_penalty_past_the_window():
    model = small_window_model()
    penalised = replace(GREEDY, repetition_penalty=1.5)
    cached = generated(model, PROMPTS, penalised)
    assert cached == generated(model, PROMPTS, penalised, use_cache=False)
    assert cached != generated(model, PROMPTS)  # the penalty changed the answers


def test_sampled_batches_are_reproducible_with_a_seed_past_the_window():
    model = small_window_model()
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=50)
    first = generated(model, PROMPTS, sampling, seed=3)
    assert generated(model, PROMPTS, sampling, seed=3) == first
    assert generated(model, PROMPTS, sampling, seed=3, use_cache=False) == first
    assert generated(model, PROMPTS, sampling, seed=4) != first


def test_a_prompt_longer_than_the_window_keeps_its_end():
    model = small_window_model()
    prompt = ids(40, seed=40)
    assert generated(model, [prompt]) == generated(model, [prompt[-WINDOW:]])


def test_the_generator_yields_max_new_tokens_and_stops():
    model = small_window_model()
    assert len(list(generate_ids(model, [[1, 2]], replace(GREEDY, max_new_tokens=7)))) == 7


@pytest.mark.parametrize("tied", [False, True])
def test_one_row_and_many_rows_get_the_models_own_greedy_tokens(tied):
    """Decoding lays the output layer out differently for one row and for several; tokens must not move."""
    model = small_window_model(tie_weights=tied)
    prompt = ids(8, seed=1)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(8):  # the model's own forward over the growing sequence, inside the window
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    alone = generated(model, [prompt])[0]
    assert alone[:8] == sequence[8:]
    assert generated(model, [prompt, ids(3, seed=3)])[0] == alone


def test_generation_follows_weights_changed_in_place():
    """The decoding copy of the output layer is never stale: not after load_state_dict, nor an optimizer step."""
    model, other = small_window_model(seed=0), small_window_model(seed=1)
    prompt = ids(6, seed=6)
    assert generated(model, [prompt]) != generated(other, [prompt])
    model.load_state_dict(other.state_dict())
    assert generated(model, [prompt]) == generated(other, [prompt])

    assert generated(model, [prompt])[0][0] != 7
    optimizer = torch.optim.SGD(model.head.parameters(), lr=10.0)
    (-model(torch.tensor([prompt]))[0, -1, 7]).backward()  # one big step of the output layer towards 7
    optimizer.step()
    with torch.no_grad():
        assert int(model(torch.tensor([prompt]))[0, -1].argmax()) == 7
    assert generated(model, [prompt])[0][0] == 7


@pytest.mark.parametrize(
    ("options", "allowed"),
    [
        ({}, {0, 1, 2, 3, 4}),
        ({"top_k": 3}, {1, 3, 4}),
        ({"top_p": 0.75}, {1, 3, 4}),  # 0.4 + 0.3 fall short of 0.75, so 0.15 joins them
        ({"top_p": 0.6}, {1, 3}),
        ({"top_k": 4, "top_p": 0.6}, {1, 3}),  # top-p over the top 4, renormalised: 0.42 + 0.32 > 0.6
        ({"min_p": 0.3}, {1, 3, 4}),  # at least 0.3 x 0.4
        ({"top_k": 3, "min_p": 0.5}, {1, 3}),
    ],
)
def test_sampling_filters_allow_exactly_the_tokens_they_should(options, allowed):
    logits = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]).log()
    sampling = replace(SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), **options)
    generator = torch.Generator().manual_seed(0)
    assert {int(next_token(logits, sampling, generator=generator)) for _ in range(400)} == allowed


def test_stream_batch_rows_keep_their_own_limits_above_the_shared_setting():
    model = small_window_model()
    steps = list(
        stream_batch(model, TOK, PROMPTS[:2], replace(GREEDY, max_new_tokens=3), max_new_tokens=[3, 30])
    )
    finals = [next(c for s in steps if (c := s[row]) is not None and c.finish_reason) for row in (0, 1)]
    assert [(c.finish_reason, c.completion_tokens) for c in finals] == [("length", 3), ("length", 30)]


def test_the_last_chunk_reports_decoding_speed():
    model = small_window_model()
    last = list(stream(model, TOK, [1, 2, 3], replace(GREEDY, max_new_tokens=20)))[-1]
    assert last.seconds > 0
    assert last.tokens_per_sec == pytest.approx(last.completion_tokens / last.seconds)


def test_gpt2_characters_split_across_tokens_stream_out_whole(gpt2_ranks):
    tokenizer = build_tokenizer("gpt2", gpt2_ranks_path=str(gpt2_ranks))
    text = "Ünïcödé: 😀 ok, 中文字符 and ❤️!"
    tokens = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokens)  # some character spans several tokens
    tracker = _TextTracker(tokenizer, stop=DEFAULT_STOP_STRINGS)
    chunks = [tracker.push(t) for t in tokens] + [tracker.flush()]
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == text


# -- a one-shot prompt too long for the window ---------------------------------------------------------


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
    whole = len(TEMPLATE.encode_prompt(TOK, "Sum up.", long_context))
    assert f"the prompt has {whole} tokens; cut to 156" in err

    assert main([*argv[:-2], "--max-tokens", "100", "--json"]) == 0  # a prompt that fits: no note
    assert capsys.readouterr().err == ""
