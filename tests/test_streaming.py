"""Text from the engine: whole characters only, stop strings never shown, each row's own finish and limits."""

from dataclasses import replace

import pytest
import torch

from tinylm.config import SamplingConfig
from tinylm.generate import Engine, Request, _TextTracker
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import ByteTokenizer, build_tokenizer

TOK = ByteTokenizer()
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=40)


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def memorised_engine(memorised) -> Engine:
    model, tokenizer, _ = memorised
    return Engine(model, tokenizer)


# -- whole answers ---------------------------------------------------------------------------------


def test_tiny_model_answers_what_it_memorised_exactly(memorised, memorised_engine):
    for question, answer in memorised[2]:
        done = memorised_engine.complete(
            TEMPLATE.encode_prompt(TOK, question), GREEDY, stop=TEMPLATE.stop_strings
        )
        assert (done.text, done.finish_reason) == (answer, "stop")
        assert done.completion_tokens == len(answer) + 1  # the answer's bytes, then end-of-text


def test_generate_batch_equals_complete_one_by_one(memorised, memorised_engine):
    prompts = [TEMPLATE.encode_prompt(TOK, q) for q, _ in memorised[2]]
    assert len({len(p) for p in prompts}) > 1
    sampling = replace(GREEDY, max_new_tokens=8)  # some rows stop on end-of-text, some run out of tokens
    together = memorised_engine.generate_batch(prompts, sampling, stop=TEMPLATE.stop_strings)
    alone = [memorised_engine.complete(p, sampling, stop=TEMPLATE.stop_strings) for p in prompts]
    assert together == alone
    assert {c.finish_reason for c in together} == {"stop", "length"}


# -- finishing: stop strings, end-of-text, length -----------------------------------------------------


@pytest.mark.parametrize(("stop", "shown"), [("there", "hello "), ("lo t", "hel"), ("o", "hell")])
def test_stop_string_ends_the_answer_and_is_never_shown(memorised_engine, stop, shown):
    chunks = list(memorised_engine.stream(TEMPLATE.encode_prompt(TOK, "Greet me."), GREEDY, stop=[stop]))
    text = "".join(c.text for c in chunks)
    assert text == shown
    assert stop not in text
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_string_in_a_batch_stops_only_its_row(memorised_engine):
    prompts = [TEMPLATE.encode_prompt(TOK, "Greet me."), TEMPLATE.encode_prompt(TOK, "Name a colour.")]
    done = memorised_engine.generate_batch(prompts, GREEDY, stop=["there"])
    assert [(c.text, c.finish_reason) for c in done] == [("hello ", "stop"), ("blue sky", "stop")]


def test_max_tokens_ends_with_length(memorised_engine):
    prompt = TEMPLATE.encode_prompt(TOK, "Greet me.")
    chunks = list(memorised_engine.stream(prompt, replace(GREEDY, max_new_tokens=3)))
    last = chunks[-1]
    assert "".join(c.text for c in chunks) == "hel"
    assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == ("length", 3, len(prompt))


def test_stream_batch_rows_keep_their_own_limits(random_model):
    engine = Engine(random_model(), TOK)
    requests = [
        Request(ids(1, seed=1), replace(GREEDY, max_new_tokens=3)),
        Request(ids(5, seed=5), replace(GREEDY, max_new_tokens=30)),
    ]
    finals = {row: chunk for row, chunk in engine.stream_batch(requests) if chunk.finish_reason}
    assert [(finals[r].finish_reason, finals[r].completion_tokens) for r in (0, 1)] == [
        ("length", 3),
        ("length", 30),
    ]


def test_the_last_chunk_reports_decoding_speed(random_model):
    last = list(Engine(random_model(), TOK).stream([1, 2, 3], replace(GREEDY, max_new_tokens=20)))[-1]
    assert last.seconds > 0
    assert last.tokens_per_sec == pytest.approx(last.completion_tokens / last.seconds)


# -- the text tracker: whole characters, held-back stop strings ------------------------------------------


@pytest.mark.parametrize("text", ["é😀", "a€b 中文 👨‍👩‍👧!"])
def test_a_character_split_across_byte_tokens_streams_out_whole(text):
    tracker = _TextTracker(TOK, stop=TEMPLATE.stop_strings)
    chunks = [tracker.push(byte) for byte in text.encode("utf-8")]
    chunks.append(tracker.flush())
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == text
    assert any(chunk == "😀" for chunk in chunks) or "😀" not in text  # a 4-byte character in one piece


def test_gpt2_characters_split_across_tokens_stream_out_whole(gpt2_ranks):
    tokenizer = build_tokenizer("gpt2", gpt2_ranks_path=str(gpt2_ranks))
    text = "Ünïcödé: 😀 ok, 中文字符 and ❤️!"
    tokens = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokens)  # some character spans several tokens
    tracker = _TextTracker(tokenizer, stop=TEMPLATE.stop_strings)
    chunks = [tracker.push(t) for t in tokens] + [tracker.flush()]
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == text


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
