"""Conversations as training data: OpenAI `messages` and ShareGPT `conversations` records, rendered exactly as
the chat and the API render earlier turns, the loss on every assistant turn, whole turns dropped to fit."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tinylm.data.instructions import encode_records, split_records
from tinylm.data.sources import DataError, Record, load_records
from tinylm.prompts import TEMPLATE, ConversationError, Turn, conversation_turns
from tinylm.server import ChatMessage, chat_prompt
from tinylm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()

MESSAGES = [
    {"role": "system", "content": "Answer in digits."},
    {"role": "user", "content": "What is 7 plus 5?"},
    {"role": "assistant", "content": "12"},
    {"role": "user", "content": "And minus 3?"},
    {"role": "assistant", "content": "9"},
]
SHAREGPT = [
    {"from": "system", "value": "Answer in digits."},
    {"from": "human", "value": "What is 7 plus 5?"},
    {"from": "gpt", "value": "12"},
    {"from": "human", "value": "And minus 3?"},
    {"from": "gpt", "value": "9"},
]


def read(tmp_path, records, suffix=".jsonl"):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return load_records(str(path), synthetic_size=0, seed=0)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("field", ["messages", "conversations"])
def test_both_formats_read_from_every_file_type_as_turns(tmp_path, suffix, field):
    conversation = MESSAGES if field == "messages" else SHAREGPT
    (record,) = read(tmp_path, [{field: conversation}], suffix)
    assert record.turns == (
        Turn("What is 7 plus 5?", "12"),
        Turn("And minus 3?", "9", context="Answer in digits."),  # system: the last user turn's context
    )


def test_dolly_and_alpaca_records_stay_single_turn(tmp_path):
    records = read(
        tmp_path, [{"instruction": "a", "context": "c", "response": "b"}, {"instruction": "a", "output": "b"}]
    )
    assert [r.turns for r in records] == [(Turn("a", "b", "c"),), (Turn("a", "b"),)]


def test_training_tokens_are_the_chat_prompt_of_the_api_then_the_answer():
    (record,) = [Record("And minus 3?", "Answer in digits.", "9", history=(Turn("What is 7 plus 5?", "12"),))]
    (example,) = encode_records(TOK, [record], max_seq_length=256, train_on_prompt=False)
    asked = chat_prompt(TOK, [ChatMessage(**m) for m in MESSAGES[:-1]])
    assert example.tokens == [*asked, *TOK.encode("9"), TOK.eos_id]


def test_the_loss_counts_exactly_the_assistant_turns_and_their_end_of_text():
    turns = conversation_turns([(m["role"], m["content"]) for m in MESSAGES], answered=True)
    example = TEMPLATE.encode_conversation(TOK, turns, max_seq_length=256)
    counted = [t for t, keep in zip(example.tokens, example.loss_mask, strict=True) if keep]
    assert counted == [*TOK.encode("12"), TOK.eos_id, *TOK.encode("9"), TOK.eos_id]
    spans = "".join("1" if keep else "0" for keep in example.loss_mask)
    assert spans.strip("0").count("0") > 0  # two separate answers, the second prompt between them
    with_prompt = TEMPLATE.encode_conversation(TOK, turns, max_seq_length=256, train_on_prompt=True)
    assert with_prompt.tokens == example.tokens and with_prompt.loss_mask == [False] + [True] * (
        len(example.tokens) - 1
    )


def test_one_turn_is_the_single_record_example():
    for max_seq_length in (256, 40):  # whole, and cut by the single-record rule
        alone = TEMPLATE.encode_example(
            TOK, "Count the words.", "red blue", "2", max_seq_length=max_seq_length
        )
        turn = Turn("Count the words.", "2", "red blue")
        assert TEMPLATE.encode_conversation(TOK, [turn], max_seq_length=max_seq_length) == alone


def test_a_cut_conversation_drops_whole_oldest_turns():
    turns = [Turn(f"Question {i}?", f"answer {i}") for i in range(6)]
    sizes = [sum(map(len, TEMPLATE.encode_turn(TOK, t))) for t in turns]
    window = sum(sizes[-3:]) + 5  # room for the last three turns, not four
    example = TEMPLATE.encode_conversation(TOK, turns, max_seq_length=window - 1)
    kept = TEMPLATE.encode_conversation(TOK, turns[-3:], max_seq_length=10_000)
    assert example == kept
    assert TOK.decode(example.tokens).startswith("### Instruction:\nQuestion 3?")


def test_a_last_turn_longer_than_the_window_alone_is_cut_as_a_record_is():
    turns = [Turn("Hi?", "hello"), Turn("Count the words.", "300", " ".join(["word"] * 300))]
    example = TEMPLATE.encode_conversation(TOK, turns, max_seq_length=128)
    last = turns[-1]
    assert example == TEMPLATE.encode_example(
        TOK, last.instruction, last.context, last.response, max_seq_length=128
    )


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": "hi"}, "field messages must be a non-empty list of messages"),
        ({"messages": []}, "field messages must be a non-empty list of messages"),
        ({"messages": [{"role": "user", "content": "hi"}, "yo"]}, "field messages[1] must be an object"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "field messages[0].role must be one of system"),
        ({"messages": [{"role": "user", "content": 3}]}, "field messages[0].content must be text, got int"),
        (
            {"conversations": [{"from": "bot", "value": "x"}]},
            "field conversations[0].from must be one of human",
        ),
        ({"conversations": [{"from": "human", "value": "x"}]}, "field conversations: the last message"),
        (
            {
                "messages": [
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "field messages: the conversation must start with a user message",
        ),
    ],
)
def test_a_malformed_conversation_names_its_line_and_field(tmp_path, record, expected):
    good = {"messages": MESSAGES}
    with pytest.raises(DataError) as error:
        read(tmp_path, [good, good, record])
    assert str(error.value).startswith(f"{tmp_path / 'data.jsonl'}:3: ")
    assert expected in str(error.value)


def test_unanswered_or_unknown_messages_are_refused_by_the_shared_mapping():
    with pytest.raises(ConversationError, match="must be the user's"):
        conversation_turns([("user", "q"), ("assistant", "a")], answered=False)
    with pytest.raises(ConversationError, match="unknown role 'tool'"):
        conversation_turns([("tool", "q")], answered=False)


def test_consecutive_messages_of_one_role_are_joined_as_the_api_joins_them():
    turns = conversation_turns(
        [("user", "a"), ("user", "b"), ("assistant", "c"), ("assistant", "d")], answered=True
    )
    assert turns == [Turn("a\n\nb", "c\n\nd")]


def test_a_held_out_conversation_is_new_when_any_earlier_turn_differs():
    first = Record("And minus 3?", "", "9", history=(Turn("What is 7 plus 5?", "12"),))
    other = Record("And minus 3?", "", "2", history=(Turn("What is 1 plus 4?", "5"),))
    splits = split_records([first, other], dataset_size=1, val_fraction=0.5, seed=0)
    assert len(splits.val) == 1  # the same last question after other turns is not a duplicate
    with pytest.raises(DataError, match="validation split is empty"):
        split_records([first, first], dataset_size=1, val_fraction=0.5, seed=0)


def test_every_turn_of_a_conversation_is_a_question_after_the_turns_before_it():
    record = Record("And minus 3?", "", "9", "add_then_subtract", history=(Turn("What is 7 plus 5?", "12"),))
    first, second = record.questions()
    assert (first.instruction, first.response, first.history) == ("What is 7 plus 5?", "12", ())
    assert second == record
