"""The prompt template's loss mask, truncation rule and batching: what the model is trained to predict."""

import torch

from tinylm.data.instructions import collate
from tinylm.model import IGNORE_INDEX
from tinylm.prompts import (
    INSTRUCTION_HEADER,
    RESPONSE_HEADER,
    Turn,
    chat_prompt_budget,
    encode_chat,
    encode_example,
    encode_prompt,
)
from tinylm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_prompt_is_masked_and_response_plus_eos_counts():
    example = encode_example(TOK, "Add 2 and 3.", "", "5 apples", max_seq_length=128)
    prompt = encode_prompt(TOK, "Add 2 and 3.")
    assert example.tokens == [*prompt, *TOK.encode("5 apples"), TOK.eos_id]
    assert example.loss_mask == [False] * len(prompt) + [True] * (len("5 apples") + 1)
    assert TOK.decode(prompt) == f"{INSTRUCTION_HEADER}Add 2 and 3.{RESPONSE_HEADER}"


def test_context_goes_between_instruction_and_response():
    prompt = TOK.decode(encode_prompt(TOK, "Count the words.", "red blue"))
    assert prompt == "### Instruction:\nCount the words.\n\n### Context:\nred blue\n\n### Response:\n"
    assert "Context" not in TOK.decode(encode_prompt(TOK, "Count the words.", "   "))


def test_train_on_prompt_counts_every_position_but_the_first():
    example = encode_example(TOK, "Say hi.", "ctx", "hi", max_seq_length=128, train_on_prompt=True)
    assert example.loss_mask[0] is False
    assert all(example.loss_mask[1:])
    assert len(example.loss_mask) == len(example.tokens)


def test_a_very_long_context_is_cut_and_the_response_kept_whole():
    context = " ".join(["word"] * 300)
    example = encode_example(TOK, "Count the words.", context, "300", max_seq_length=128)
    text = TOK.decode(example.tokens)
    assert len(example.tokens) == 129  # the window: inputs and targets are the sequence shifted by one
    assert text.startswith("### Instruction:\nCount the words.\n\n### Context:\nword word")
    assert text.endswith("\n\n### Response:\n300<|endoftext|>")
    assert sum(example.loss_mask) == len("300") + 1


def test_a_very_long_response_keeps_its_start_and_half_the_window_for_the_prompt():
    response = "".join(chr(ord("a") + i % 26) for i in range(500))
    example = encode_example(TOK, "Recite the alphabet. " * 10, "", response, max_seq_length=64)
    assert len(example.tokens) == 65
    n_prompt = example.loss_mask.index(True)
    assert n_prompt >= 65 // 2
    assert TOK.decode(example.tokens[:n_prompt]).endswith(RESPONSE_HEADER)
    assert TOK.decode(example.tokens[n_prompt:]) == response[: 65 - n_prompt]


def test_collate_shifts_by_one_and_ignores_masked_and_padded_targets():
    short = encode_example(TOK, "Hi.", "", "yo", max_seq_length=128)
    long = encode_example(TOK, "Hello there.", "", "hello", max_seq_length=128)
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
    ids, dropped = encode_chat(TOK, history, "Third?", max_prompt_tokens=1000)
    assert dropped == 0
    assert ids == [
        *encode_prompt(TOK, "First?"),
        *TOK.encode("one"),
        TOK.eos_id,
        *encode_prompt(TOK, "Second?"),
        *TOK.encode("two"),
        TOK.eos_id,
        *encode_prompt(TOK, "Third?"),
    ]
    current = encode_prompt(TOK, "Third?")
    ids, dropped = encode_chat(TOK, history, "Third?", max_prompt_tokens=len(current) + 60)
    assert dropped == 1
    assert ids[-len(current) :] == current
    assert TOK.decode(ids).startswith("### Instruction:\nSecond?")


def test_chat_prompt_budget_leaves_room_for_the_answer_but_never_more_than_half_the_window():
    assert chat_prompt_budget(128, 100) == 64
    assert chat_prompt_budget(128, 20) == 108
    assert chat_prompt_budget(128, 0) == 127
