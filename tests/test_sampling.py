"""Picking the next token: the filters allow exactly the tokens they should, and a seed makes draws repeat."""

from dataclasses import replace

import pytest
import torch

from tinylm.config import SamplingConfig
from tinylm.generate import Engine, next_token
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SAMPLED = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=50)


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


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


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for sampling in (SamplingConfig(temperature=1.5, top_k=1), SamplingConfig(temperature=1.5, top_p=1e-6)):
        assert torch.equal(next_token(logits, sampling, generator=generator), logits.argmax(-1))


def test_repetition_penalty_steers_away_from_seen_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    seen = torch.tensor([[True, False, False]])
    sampling = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    assert int(next_token(logits, sampling, seen=seen)) == 1
    assert int(next_token(logits, replace(sampling, repetition_penalty=1.0), seen=seen)) == 0


def test_a_seed_makes_an_answer_reproducible(random_model):
    engine = Engine(random_model(), TOK)
    prompt = TEMPLATE.encode_prompt(TOK, "Tell me a story.")
    first = engine.complete(prompt, SAMPLED, seed=7)
    assert engine.complete(prompt, SAMPLED, seed=7) == first
    others = {engine.complete(prompt, SAMPLED, seed=s).text for s in range(8, 12)}
    assert others != {first.text}


def test_a_seed_makes_a_batch_reproducible_past_the_window_with_or_without_the_cache(random_model):
    engine = Engine(random_model(), TOK)
    prompts = [ids(n, seed=n) for n in (1, 5, 12, 40)]  # around a 16-token window

    def generated(**options) -> list[list[int]]:
        return torch.stack(list(engine.generate_ids(prompts, SAMPLED, **options)), 1).tolist()

    first = generated(seed=3)
    assert generated(seed=3) == first
    assert generated(seed=3, use_cache=False) == first
    assert generated(seed=4) != first
