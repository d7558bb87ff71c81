"""The engine's token generator: the KV cache, batching, the sliding window, rows joining and leaving a
batch and a refreshed output layer never change a greedy row's tokens."""

from dataclasses import replace

import pytest
import torch

from tinylm.config import SamplingConfig
from tinylm.generate import Engine
from tinylm.model import KVCache
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
WINDOW = 16  # conftest's random_model
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=50)  # 50 new tokens slide a 16-token window often


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# Lengths 1 to 40 around the window: rows slide at different steps, one starts past the window.
PROMPTS = [ids(n, seed=n) for n in (1, 5, 12, 40)]


def generated(engine: Engine, prompts: list[list[int]], sampling=GREEDY, **options) -> list[list[int]]:
    return torch.stack(list(engine.generate_ids(prompts, sampling, **options)), 1).tolist()


def greedy_steps(engine: Engine, cache: KVCache, logits: torch.Tensor, steps: int):
    """`steps` greedy tokens of every row in the cache, as lists, and the logits that follow them."""
    tokens = []
    for _ in range(steps):
        tokens.append(logits.argmax(-1))
        logits = engine.step(cache, tokens[-1])
    return torch.stack(tokens, 1).tolist(), logits


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_rows_get_the_models_own_argmax_alone_and_in_a_batch(random_model, tied):
    """Decoding lays the output layer out differently for one row and for several; tokens must not move."""
    model = random_model(tie_weights=tied)
    engine = Engine(model, TOK)
    prompt = ids(8, seed=1)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(8):  # the model's own forward over the growing sequence, inside the window
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    alone = generated(engine, [prompt])[0]
    assert alone[:8] == sequence[8:]
    assert generated(engine, [prompt, ids(3, seed=3)])[0] == alone


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_rows_equal_each_prompt_alone_past_the_window(random_model, use_cache, arch):
    engine = Engine(random_model(**arch), TOK)
    together = generated(engine, PROMPTS, use_cache=use_cache)
    assert together == [generated(engine, [p], use_cache=use_cache)[0] for p in PROMPTS]
    assert len({tuple(row) for row in together}) == len(PROMPTS)  # the rows really differ


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_decoding_equals_uncached_past_the_context_window(random_model, arch, qk_norm):
    # 200 new tokens: the 16-token window slides and is prefilled again several times.
    sampling = replace(GREEDY, max_new_tokens=200)
    engine = Engine(random_model(**arch, qk_norm=qk_norm), TOK)
    prompt = ids(10, seed=2)
    assert generated(engine, [prompt], sampling) == generated(engine, [prompt], sampling, use_cache=False)


def test_a_trained_models_cached_decoding_equals_uncached_past_the_context_window(memorised):
    sampling = replace(GREEDY, max_new_tokens=200)  # the 64-token window slides several times
    engine = Engine(memorised[0], TOK)
    prompt = TEMPLATE.encode_prompt(TOK, "Greet me.")
    assert generated(engine, [prompt], sampling) == generated(engine, [prompt], sampling, use_cache=False)


def test_cached_equals_uncached_with_a_repetition_penalty_past_the_window(random_model):
    engine = Engine(random_model(), TOK)
    penalised = replace(GREEDY, repetition_penalty=1.5)
    cached = generated(engine, PROMPTS, penalised)
    assert cached == generated(engine, PROMPTS, penalised, use_cache=False)
    assert cached != generated(engine, PROMPTS)  # the penalty changed the answers


def test_a_prompt_longer_than_the_window_keeps_its_end(random_model):
    engine = Engine(random_model(), TOK)
    prompt = ids(40, seed=40)
    cut = generated(engine, [prompt[-WINDOW:]])
    assert generated(engine, [prompt]) == cut
    assert generated(engine, [prompt], use_cache=False) == cut


def test_the_generator_yields_max_new_tokens_and_stops(random_model):
    engine = Engine(random_model(), TOK)
    assert len(list(engine.generate_ids([[1, 2]], replace(GREEDY, max_new_tokens=7)))) == 7


def test_empty_prompt_is_rejected(random_model):
    with pytest.raises(ValueError, match="at least one token"):
        next(Engine(random_model(), TOK).generate_ids([[1, 2], []], GREEDY))


@pytest.mark.parametrize("leaving", [1, 3])  # a short row, or the longest (whose padding then goes)
def test_a_row_that_leaves_does_not_change_the_others_tokens(random_model, leaving):
    engine = Engine(random_model(), TOK)
    cache, logits = engine.prefill(PROMPTS)
    before, logits = greedy_steps(engine, cache, logits, 10)
    staying = [row for row in range(len(PROMPTS)) if row != leaving]
    with torch.inference_mode():
        cache.keep(staying)
    after, _ = greedy_steps(engine, cache, logits[staying], GREEDY.max_new_tokens - 10)
    together = generated(engine, PROMPTS)
    assert [before[row] + tokens for row, tokens in zip(staying, after, strict=True)] == [
        together[row] for row in staying
    ]


@pytest.mark.parametrize("newcomer", [0, 3])  # shorter than the running rows' windows, or longer
def test_a_row_that_joins_a_running_batch_gets_its_own_tokens_and_the_others_keep_theirs(
    random_model, newcomer
):
    engine = Engine(random_model(), TOK)
    running = [PROMPTS[1], PROMPTS[2]]
    cache, logits = engine.prefill(running)
    before, logits = greedy_steps(engine, cache, logits, 3)
    joining, joining_logits = engine.prefill([PROMPTS[newcomer]])
    with torch.inference_mode():
        cache.join(joining)
    after, _ = greedy_steps(engine, cache, torch.cat([logits, joining_logits]), 40)
    assert [before[row] + after[row] for row in (0, 1)] == [generated(engine, [p])[0][:43] for p in running]
    assert after[2] == generated(engine, [PROMPTS[newcomer]])[0][:40]


def test_refresh_makes_the_engine_follow_weights_changed_in_place(random_model):
    model, other = random_model(seed=0), random_model(seed=1)
    engine, reference = Engine(model, TOK), Engine(other, TOK)
    prompt = ids(6, seed=6)
    assert generated(engine, [prompt]) != generated(reference, [prompt])
    model.load_state_dict(other.state_dict())
    engine.refresh()
    assert generated(engine, [prompt]) == generated(reference, [prompt])

    assert generated(engine, [prompt])[0][0] != 7
    optimizer = torch.optim.SGD(model.head.parameters(), lr=10.0)
    (-model(torch.tensor([prompt]))[0, -1, 7]).backward()  # one big step of the output layer towards 7
    optimizer.step()
    with torch.no_grad():
        assert int(model(torch.tensor([prompt]))[0, -1].argmax()) == 7
    engine.refresh()
    assert generated(engine, [prompt])[0][0] == 7
