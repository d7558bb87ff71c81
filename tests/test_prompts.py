"""The prompt template's loss mask, truncation rule, chat prompts and batching: what the model is trained
to predict and what it is asked."""

import json

import pytest
import torch

import tinylm.data.prepare as prepare_module
from tinylm.config import apply_overrides
from tinylm.data.instructions import collate
from tinylm.model import IGNORE_INDEX
from tinylm.prompts import TEMPLATE, EncodedPrompt, PromptTemplate, Turn, chat_prompt_budget
from tinylm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_prompt_is_masked_and_response_plus_eos_counts():
    example = TEMPLATE.encode_example(TOK, "Add 2 and 3.", "", "5 apples", max_seq_length=128)
    prompt = TEMPLATE.encode_prompt(TOK, "Add 2 and 3.")
    assert example.tokens == [*prompt, *TOK.encode("5 apples"), TOK.eos_id]
    assert example.loss_mask == [False] * len(prompt) + [True] * (len("5 apples") + 1)
    assert TOK.decode(prompt) == f"{TEMPLATE.instruction_header}Add 2 and 3.{TEMPLATE.response_header}"


def test_context_goes_between_instruction_and_response():
    prompt = TOK.decode(TEMPLATE.encode_prompt(TOK, "Count the words.", "red blue"))
    assert prompt == "### Instruction:\nCount the words.\n\n### Context:\nred blue\n\n### Response:\n"
    assert "Context" not in TOK.decode(TEMPLATE.encode_prompt(TOK, "Count the words.", "   "))


def test_train_on_prompt_counts_every_position_but_the_first():
    example = TEMPLATE.encode_example(TOK, "Say hi.", "ctx", "hi", max_seq_length=128, train_on_prompt=True)
    assert example.loss_mask[0] is False
    assert all(example.loss_mask[1:])
    assert len(example.loss_mask) == len(example.tokens)


def test_a_very_long_context_is_cut_and_the_response_kept_whole():
    context = " ".join(["word"] * 300)
    example = TEMPLATE.encode_example(TOK, "Count the words.", context, "300", max_seq_length=128)
    text = TOK.decode(example.tokens)
    assert len(example.tokens) == 129  # the window: inputs and targets are the sequence shifted by one
    assert text.startswith("### Instruction:\nCount the words.\n\n### Context:\nword word")
    assert text.endswith("\n\n### Response:\n300<|endoftext|>")
    assert sum(example.loss_mask) == len("300") + 1


def test_a_very_long_response_keeps_its_start_and_half_the_window_for_the_prompt():
    response = "".join(chr(ord("a") + i % 26) for i in range(500))
    example = TEMPLATE.encode_example(TOK, "Recite the alphabet. " * 10, "", response, max_seq_length=64)
    assert len(example.tokens) == 65
    n_prompt = example.loss_mask.index(True)
    assert n_prompt >= 65 // 2
    assert TOK.decode(example.tokens[:n_prompt]).endswith(TEMPLATE.response_header)
    assert TOK.decode(example.tokens[n_prompt:]) == response[: 65 - n_prompt]


def test_collate_shifts_by_one_and_ignores_masked_and_padded_targets():
    short = TEMPLATE.encode_example(TOK, "Hi.", "", "yo", max_seq_length=128)
    long = TEMPLATE.encode_example(TOK, "Hello there.", "", "hello", max_seq_length=128)
    inputs, targets = collate([short, long], pad_id=TOK.eos_id)
    assert inputs.shape == targets.shape == (2, len(long.tokens) - 1)
    for row, example in enumerate([short, long]):
        n = len(example.tokens) - 1
        assert inputs[row, :n].tolist() == example.tokens[:-1]
        pairs = zip(example.tokens[1:], example.loss_mask[1:], strict=True)
        expected = [t if keep else IGNORE_INDEX for t, keep in pairs]
        assert targets[row, :n].tolist() == expected
        assert torch.all(inputs[row, n:] == TOK.eos_id)
        assert torch.all(targets[row, n:] == IGNORE_INDEX)
    # Only the answers (and their end-of-text) are learned.
    assert (targets[0] != IGNORE_INDEX).sum() == len("yo") + 1
    assert (targets[1] != IGNORE_INDEX).sum() == len("hello") + 1


def test_chat_prompt_carries_earlier_turns_and_drops_the_oldest_to_fit():
    history = [Turn("First?", "one"), Turn("Second?", "two")]
    whole = TEMPLATE.encode_chat(TOK, history, "Third?", max_prompt_tokens=1000)
    assert whole == EncodedPrompt(
        [
            *TEMPLATE.encode_prompt(TOK, "First?"),
            *TOK.encode("one"),
            TOK.eos_id,
            *TEMPLATE.encode_prompt(TOK, "Second?"),
            *TOK.encode("two"),
            TOK.eos_id,
            *TEMPLATE.encode_prompt(TOK, "Third?"),
        ],
        dropped_turns=0,
        cut_tokens=0,
    )
    current = TEMPLATE.encode_prompt(TOK, "Third?")
    fitted = TEMPLATE.encode_chat(TOK, history, "Third?", max_prompt_tokens=len(current) + 60)
    assert (fitted.dropped_turns, fitted.cut_tokens) == (1, 0)
    assert fitted.ids[-len(current) :] == current
    assert TOK.decode(fitted.ids).startswith("### Instruction:\nSecond?")


def test_a_question_longer_than_the_budget_drops_every_turn_and_says_how_much_of_it_was_cut():
    history = [Turn("First?", "one"), Turn("Second?", "two")]
    question = "why " * 50
    whole = len(TEMPLATE.encode_prompt(TOK, question))
    fitted = TEMPLATE.encode_chat(TOK, history, question, max_prompt_tokens=100)
    assert fitted == EncodedPrompt(
        TEMPLATE.encode_prompt(TOK, question, budget=100), dropped_turns=2, cut_tokens=whole - 100
    )
    assert len(fitted.ids) == 100


def test_a_one_shot_prompt_is_cut_in_its_context_first_and_keeps_every_header():
    instruction, context = "Summarise this passage.", "word " * 200
    fitted = TEMPLATE.encode_chat(TOK, [], instruction, context, max_prompt_tokens=100)
    assert len(fitted.ids) == 100
    assert (fitted.dropped_turns, fitted.cut_tokens) == (
        0,
        len(TEMPLATE.encode_prompt(TOK, instruction, context)) - 100,
    )
    text = TOK.decode(fitted.ids)
    assert text.startswith(f"### Instruction:\n{instruction}\n\n### Context:\nword word")
    assert text.endswith(TEMPLATE.response_header)
    fits = TEMPLATE.encode_chat(TOK, [], instruction, max_prompt_tokens=100)
    assert fits == EncodedPrompt(TEMPLATE.encode_prompt(TOK, instruction), dropped_turns=0, cut_tokens=0)


def test_no_limit_never_drops_a_turn_nor_cuts_the_question():
    history = [Turn("word " * 300, "answer " * 300) for _ in range(5)]
    question = TEMPLATE.encode_prompt(TOK, "why " * 500)
    fitted = TEMPLATE.encode_chat(TOK, history, "why " * 500, max_prompt_tokens=None)
    assert (fitted.dropped_turns, fitted.cut_tokens) == (0, 0)
    assert fitted.ids[-len(question) :] == question
    assert TOK.decode(fitted.ids).count(TEMPLATE.instruction_header) == 6


@pytest.mark.parametrize("context", ["", "red blue"])
def test_render_is_the_text_the_model_is_trained_on(context):
    example = TEMPLATE.encode_example(TOK, "Count the words.", context, "2", max_seq_length=128)
    rendered = TEMPLATE.render("Count the words.", context, "2")
    assert TOK.decode(example.tokens[:-1]) == rendered  # all but the end-of-text token
    assert TEMPLATE.render("Count the words.", context) == TOK.decode(
        TEMPLATE.encode_prompt(TOK, "Count the words.", context)
    )


def test_a_bpe_learns_its_merges_from_the_records_as_the_template_renders_them(
    tmp_path, make_config, monkeypatch
):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    records = [
        {"instruction": f"Say {i}.", "context": "ctx" * (i % 2), "response": f"{i}"} for i in range(40)
    ]
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    seen: list[str] = []
    real = prepare_module.build_tokenizer

    def recording(kind, *, texts=(), **options):
        seen.extend(texts)
        return real(kind, texts=seen, **options)

    monkeypatch.setattr(prepare_module, "build_tokenizer", recording)
    overrides = {"data.source": str(source), "dataset_size": 30, "tokenizer": "bpe", "bpe_vocab_size": 300}
    prepare_module.prepare_data(apply_overrides(make_config(), overrides))
    rendered = {TEMPLATE.render(r["instruction"], r["context"], r["response"]) for r in records}
    assert len(seen) == 30 and set(seen) <= rendered  # the training split, header for header
    assert any(TEMPLATE.context_header in text for text in seen)


def test_render_and_encoding_take_the_headers_from_the_template():
    template = PromptTemplate(instruction_header="Q: ", context_header="\nC: ", response_header="\nA: ")
    assert template.render("Why?", "sky", "Light.") == "Q: Why?\nC: sky\nA: Light."
    assert TOK.decode(template.encode_prompt(TOK, "Why?")) == "Q: Why?\nA: "


@pytest.mark.parametrize(("max_new", "budget"), [(0, 127), (10, 118), (20, 108), (64, 64), (100, 64)])
def test_chat_prompt_budget_leaves_room_for_the_answer_but_at_least_half_the_window(max_new, budget):
    assert chat_prompt_budget(128, max_new) == budget
