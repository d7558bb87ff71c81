import re
from collections import defaultdict

import pytest

from tinylm.data.sources import load_records
from tinylm.data.synthetic import TASK_KINDS, check_answer, synthetic_records


def _inline_words(instruction: str) -> list[str]:
    return instruction.rsplit(":", 1)[1].split()


def _questions(record: dict) -> list[tuple[str, str, str]]:
    """(instruction, context, response) of every turn: a Dolly-schema record's one, or each user message of a
    conversation with the assistant's answer to it."""
    if "messages" in record:
        messages = record["messages"]
        return [(q["content"], "", a["content"]) for q, a in zip(messages[0::2], messages[1::2], strict=True)]
    return [(record["instruction"], record["context"], record["response"])]


def _solve(kind: str, instruction: str, context: str) -> str:
    """Solve a single-turn task from its own text, independently of how it was generated."""
    numbers = [int(x) for x in re.findall(r"\d+", instruction)]
    if kind == "add":
        return str(sum(numbers))
    if kind == "compare":
        return str(max(numbers))
    if kind == "count_words":
        return str(len(context.split()))
    if kind == "reverse_words":
        return " ".join(reversed(context.split()))
    if kind == "sort_words":
        return " ".join(sorted(_inline_words(instruction)))
    if kind == "first_word":
        return context.split()[0]
    if kind == "last_word":
        return _inline_words(instruction)[-1]
    if kind == "repeat_word":
        (word,) = re.findall(r'"(\w+)"', instruction)
        return " ".join([word] * numbers[0])
    raise AssertionError(f"test does not know how to solve {kind!r}")


def _expected(record: dict) -> list[str]:
    """Every turn's answer, a follow-up's from the first turn's question and its own."""
    kind, turns = record["category"], _questions(record)
    if kind == "add_then_subtract":
        (first, _, _), (follow, _, _) = turns
        total = sum(int(x) for x in re.findall(r"\d+", first))
        (taken,) = (int(x) for x in re.findall(r"\d+", follow))
        return [str(total), str(total - taken)]
    if kind == "sort_then_reverse":
        ordered = sorted(_inline_words(turns[0][0]))
        return [" ".join(ordered), " ".join(reversed(ordered))]
    ((instruction, context, _),) = turns
    return [_solve(kind, instruction, context)]


def _phrasing(instruction: str) -> str:
    """The template behind an instruction: numbers, quoted words and inline word lists masked."""
    masked = re.sub(r'"\w+"', '"W"', re.sub(r"\d+", "N", instruction))
    return masked.rsplit(":", 1)[0] if masked.count(":") else masked


def test_same_seed_gives_same_records():
    assert synthetic_records(200, seed=3) == synthetic_records(200, seed=3)


def test_different_seed_gives_different_records():
    assert synthetic_records(200, seed=3) != synthetic_records(200, seed=4)


def test_records_follow_dolly_schema_or_are_two_turn_conversations():
    records = synthetic_records(100, seed=0)
    assert len(records) == 100
    for record in records:
        assert record["category"] in TASK_KINDS
        if "messages" in record:
            assert set(record) == {"messages", "category"}
            assert [m["role"] for m in record["messages"]] == ["user", "assistant"] * 2
            assert all(isinstance(m["content"], str) and m["content"] for m in record["messages"])
        else:
            assert set(record) == {"instruction", "context", "response", "category"}
            assert all(isinstance(value, str) for value in record.values())
            assert record["instruction"] and record["response"]
    assert sum("messages" in r for r in records) == 20  # two kinds of ten


def test_every_conversation_reads_as_training_records_do():
    read = load_records("synthetic", synthetic_size=50, seed=0)
    for record, loaded in zip(synthetic_records(50, seed=0), read, strict=True):
        assert [(t.instruction, t.context, t.response) for t in loaded.turns] == _questions(record)
        assert loaded.category == record["category"]


def test_at_least_six_kinds_all_present_in_sixty_records():
    assert len(TASK_KINDS) >= 6
    assert {r["category"] for r in synthetic_records(60, seed=1)} == set(TASK_KINDS)


def test_both_context_and_inline_prompts_occur():
    questions = [q for r in synthetic_records(200, seed=2) for q in _questions(r)]
    assert any(context for _, context, _ in questions)
    assert any(not context for _, context, _ in questions)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_answer_is_correct(seed):
    for record in synthetic_records(400, seed=seed):
        assert [response for _, _, response in _questions(record)] == _expected(record), record


def test_each_kind_has_at_least_three_phrasings():
    phrasings = defaultdict(set)
    for record in synthetic_records(300, seed=5):
        for turn, (instruction, _, _) in enumerate(_questions(record)):
            phrasings[record["category"], turn].add(_phrasing(instruction))
    assert {kind for kind, _ in phrasings} == set(TASK_KINDS)
    for key, seen in phrasings.items():
        assert len(seen) >= 3, (key, seen)


def test_held_out_seed_is_mostly_unseen():
    train = {str(_questions(r)) for r in synthetic_records(2000, seed=0)}
    held_out = [str(_questions(r)) for r in synthetic_records(500, seed=1)]
    assert len(train) > 1500
    assert sum(p in train for p in held_out) < len(held_out) // 4


def test_answers_are_short():
    for record in synthetic_records(500, seed=6):
        for instruction, context, response in _questions(record):
            assert len(response.split()) <= 6
            assert len(instruction) + len(context) + len(response) < 160


@pytest.mark.parametrize("n", [0, -1])
def test_non_positive_size_is_rejected(n):
    with pytest.raises(ValueError, match="dataset_size"):
        synthetic_records(n, seed=0)


def test_check_answer_is_exact_after_strip():
    record = {"instruction": "What is 7 plus 5?", "context": "", "response": "12", "category": "add"}
    assert check_answer(record, "12")
    assert check_answer(record, " 12\n")
    assert not check_answer(record, "12.")
    assert not check_answer(record, "1 2")
    assert not check_answer(record, "")
