import re
from collections import defaultdict

import pytest

from tinylm.data.synthetic import TASK_KINDS, check_answer, synthetic_records


def _inline_words(instruction: str) -> list[str]:
    return instruction.rsplit(":", 1)[1].split()


def _expected(record: dict[str, str]) -> str:
    """Solve the record from its own text, independently of how it was generated."""
    kind, instruction, context = record["category"], record["instruction"], record["context"]
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


def _phrasing(instruction: str) -> str:
    """The template behind an instruction: numbers, quoted words and inline word lists masked."""
    masked = re.sub(r'"\w+"', '"W"', re.sub(r"\d+", "N", instruction))
    return masked.rsplit(":", 1)[0] if masked.count(":") else masked


def test_same_seed_gives_same_records():
    assert synthetic_records(200, seed=3) == synthetic_records(200, seed=3)


def test_different_seed_gives_different_records():
    assert synthetic_records(200, seed=3) != synthetic_records(200, seed=4)


def test_records_follow_dolly_schema():
    records = synthetic_records(100, seed=0)
    assert len(records) == 100
    for record in records:
        assert set(record) == {"instruction", "context", "response", "category"}
        assert all(isinstance(value, str) for value in record.values())
        assert record["instruction"] and record["response"]
        assert record["category"] in TASK_KINDS


def test_at_least_six_kinds_all_present_in_sixty_records():
    assert len(TASK_KINDS) >= 6
    assert {r["category"] for r in synthetic_records(60, seed=1)} == set(TASK_KINDS)


def test_both_context_and_inline_prompts_occur():
    records = synthetic_records(200, seed=2)
    assert any(r["context"] for r in records)
    assert any(not r["context"] for r in records)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_answer_is_correct(seed):
    for record in synthetic_records(400, seed=seed):
        assert record["response"] == _expected(record), record


def test_each_kind_has_at_least_three_phrasings():
    phrasings = defaultdict(set)
    for record in synthetic_records(300, seed=5):
        phrasings[record["category"]].add(_phrasing(record["instruction"]))
    for kind in TASK_KINDS:
        assert len(phrasings[kind]) >= 3, (kind, phrasings[kind])


def test_held_out_seed_is_mostly_unseen():
    train = {(r["instruction"], r["context"]) for r in synthetic_records(2000, seed=0)}
    held_out = [(r["instruction"], r["context"]) for r in synthetic_records(500, seed=1)]
    assert len(train) > 1500
    assert sum(p in train for p in held_out) < len(held_out) // 4


def test_answers_are_short():
    for record in synthetic_records(500, seed=6):
        assert len(record["response"].split()) <= 6
        assert len(record["instruction"]) + len(record["context"]) + len(record["response"]) < 160


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
