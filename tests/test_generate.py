"""Generation: greedy is argmax, the KV cache and batching change nothing, streamed text is always whole."""

from dataclasses import replace

import pytest
import torch

from tinylm.config import ModelConfig, SamplingConfig
from tinylm.generate import _TextTracker, complete, generate_batch, generate_ids, next_token, stream
from tinylm.model import TinyLM
from tinylm.prompts import DEFAULT_STOP_STRINGS, TEMPLATE
from tinylm.tokenizer import ByteTokenizer

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=40)
encode_prompt = TEMPLATE.encode_prompt
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def random_model() -> TinyLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_length=64, dropout=0.0
    )
    return TinyLM(config).eval()


def take(model, prompts, sampling, n, **kwargs) -> torch.Tensor:
    """The first n generated tokens of every row, (B, n)."""
    tokens = generate_ids(model, prompts, sampling, pad_id=TOK.eos_id, **kwargs)
    try:
        return torch.stack([next(tokens) for _ in range(n)], dim=1)
    finally:
        tokens.close()


def prompt_ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- the memorised model answers exactly ----------------------------------------------------------


def test_tiny_model_answers_what_it_memorised_exactly(memorised):
    model, tokenizer, examples = memorised
    for question, answer in examples:
        done = complete(
            model, tokenizer, encode_prompt(tokenizer, question), GREEDY, stop=DEFAULT_STOP_STRINGS
        )
        assert (done.text, done.finish_reason) == (answer, "stop")
        assert done.completion_tokens == len(answer) + 1  # the answer's bytes, then end-of-text


# -- the token generator ----------------------------------------------------------------------------


def test_greedy_is_the_argmax_of_the_uncached_forward(random_model):
    prompt = prompt_ids(12, seed=1)
    generated = take(random_model, [prompt], GREEDY, 30)[0].tolist()
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            sequence.append(int(random_model(torch.tensor([sequence]))[0, -1].argmax()))
    assert generated == sequence[len(prompt) :]


@pytest.mark.parametrize("which", ["random", "memorised"])
def test_cached_decoding_equals_uncached_past_the_context_window(random_model, memorised, which):
    model = random_model if which == "random" else memorised[0]
    prompt = prompt_ids(10, seed=2) if which == "random" else encode_prompt(TOK, "Greet me.")
    # 200 new tokens in a 64-token window: the window slides (and the cache is rebuilt) several times.
    sampling = replace(GREEDY, max_new_tokens=200)
    cached = take(model, [prompt], sampling, 200, use_cache=True)
    uncached = take(model, [prompt], sampling, 200, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_prompt_longer_than_the_window_still_generates(random_model):
    prompt = prompt_ids(100, seed=3)
    cached = take(random_model, [prompt], GREEDY, 20, use_cache=True)
    assert torch.equal(cached, take(random_model, [prompt], GREEDY, 20, use_cache=False))


def test_batched_rows_equal_each_prompt_alone(random_model):
    prompts = [prompt_ids(n, seed=n) for n in (3, 11, 20, 30)]
    batched = take(random_model, prompts, GREEDY, 30)  # the longest row stays inside the window
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row], take(random_model, [prompt], GREEDY, 30)[0]), row


def test_generate_batch_equals_complete_one_by_one(memorised):
    model, tokenizer, examples = memorised
    prompts = [encode_prompt(tokenizer, q) for q, _ in examples]
    assert len({len(p) for p in prompts}) > 1
    sampling = replace(GREEDY, max_new_tokens=8)  # some rows stop on end-of-text, some run out of tokens
    together = generate_batch(model, tokenizer, prompts, sampling, stop=DEFAULT_STOP_STRINGS)
    alone = [complete(model, tokenizer, p, sampling, stop=DEFAULT_STOP_STRINGS) for p in prompts]
    assert together == alone
    assert {c.finish_reason for c in together} == {"stop", "length"}


def test_empty_prompt_is_rejected(random_model):
    with pytest.raises(ValueError, match="at least one token"):
        next(generate_ids(random_model, [[1, 2], []], GREEDY))


# -- finishing: stop strings, end-of-text, length -----------------------------------------------------


@pytest.mark.parametrize(("stop", "shown"), [("there", "hello "), ("lo t", "hel"), ("o", "hell")])
def test_stop_string_ends_the_answer_and_is_never_shown(memorised, stop, shown):
    model, tokenizer, _ = memorised
    chunks = list(stream(model, tokenizer, encode_prompt(tokenizer, "Greet me."), GREEDY, stop=[stop]))
    text = "".join(c.text for c in chunks)
    assert text == shown
    assert stop not in text
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_string_in_a_batch_stops_only_its_row(memorised):
    model, tokenizer, _ = memorised
    prompts = [encode_prompt(tokenizer, "Greet me."), encode_prompt(tokenizer, "Name a colour.")]
    done = generate_batch(model, tokenizer, prompts, GREEDY, stop=["there"])
    assert [(c.text, c.finish_reason) for c in done] == [("hello ", "stop"), ("blue sky", "stop")]


def test_max_tokens_ends_with_length(memorised):
    model, tokenizer, _ = memorised
    sampling = replace(GREEDY, max_new_tokens=3)
    chunks = list(stream(model, tokenizer, encode_prompt(tokenizer, "Greet me."), sampling))
    last = chunks[-1]
    assert "".join(c.text for c in chunks) == "hel"
    assert (last.finish_reason, last.completion_tokens) == ("length", 3)
    assert last.prompt_tokens == len(encode_prompt(tokenizer, "Greet me."))


def test_a_seed_makes_sampling_reproducible(random_model):
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=20)
    prompt = encode_prompt(TOK, "Tell me a story.")
    first = complete(random_model, TOK, prompt, sampling, seed=7)
    assert complete(random_model, TOK, prompt, sampling, seed=7) == first
    others = {complete(random_model, TOK, prompt, sampling, seed=s).text for s in range(8, 12)}
    assert others != {first.text}


# -- the sampler ----------------------------------------------------------------------------------------


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for sampling in (SamplingConfig(temperature=1.5, top_k=1), SamplingConfig(temperature=1.5, top_p=1e-6)):
        assert torch.equal(next_token(logits, sampling, generator=generator), logits.argmax(-1))


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0]])
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5)
    generator = torch.Generator().manual_seed(0)
    assert {int(next_token(logits, sampling, generator=generator)) for _ in range(200)} == {0, 1}


def test_repetition_penalty_steers_away_from_seen_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    seen = torch.tensor([[True, False, False]])
    sampling = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    assert int(next_token(logits, sampling, seen=seen)) == 1
    assert int(next_token(logits, replace(sampling, repetition_penalty=1.0), seen=seen)) == 0


# -- the text stream ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["é😀", "a€b 中文 👨‍👩‍👧!"])
def test_a_character_split_across_byte_tokens_streams_out_whole(text):
    tracker = _TextTracker(TOK, stop=DEFAULT_STOP_STRINGS)
    chunks = [tracker.push(byte) for byte in text.encode("utf-8")]
    chunks.append(tracker.flush())
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == text
    assert any(chunk == "😀" for chunk in chunks) or "😀" not in text  # a 4-byte character in one piece


def test_a_stop_string_prefix_is_held_back_then_released_when_it_is_not_a_stop():
    tracker = _TextTracker(TOK, stop=["###"])
    assert [tracker.push(b) for b in b"ab##"] == ["a", "b", "", ""]
    assert tracker.push(ord("c")) == "##c"
    assert tracker.push(ord("#")) == ""
    assert tracker.flush() == "#"  # at the end a prefix is only text
    assert tracker.finish_reason is None


def test_a_held_prefix_that_completes_the_stop_string_is_dropped():
    tracker = _TextTracker(TOK, stop=["###"])
    shown = "".join(tracker.push(b) for b in b"ok##")
    assert tracker.push(ord("#")) == ""
    assert (shown, tracker.finish_reason) == ("ok", "stop")


def test_end_of_text_releases_held_text_and_stops():
    tracker = _TextTracker(TOK, stop=["###"])
    shown = "".join(tracker.push(b) for b in b"x#")
    assert shown == "x"
    assert tracker.push(TOK.eos_id) == "#"
    assert tracker.finish_reason == "stop"
