"""Seeded, offline instruction data whose answers can be checked exactly.

`--data synthetic` trains on these records so a tiny model's progress is measurable as exact-match accuracy on
held-out prompts (drawn with another seed). Every task is chosen to be learnable by a 2-4 layer model in a few
thousand steps: a small vocabulary of common short words (a byte-level BPE learns each as one token), small
numbers written as digits, and answers of one to six words. Records follow databricks-dolly-15k's schema; some
kinds put their input in `context` and others inline it, so both prompt-template paths are trained. The
conversation kinds are OpenAI `messages` records of two turns whose second answer needs the first turn
("What is 7 plus 5?" ... "And minus 3?"), so the demo model learns to read earlier turns as the chat sends them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

# Lowercase, common and short, so each is one BPE token and the model's job is moving words, not spelling.
_WORDS = (
    "apple", "bird", "blue", "book", "bread", "cat", "cloud", "cold",
    "dog", "door", "fish", "gold", "green", "hat", "hill", "horse",
    "king", "lake", "lamp", "leaf", "lion", "milk", "moon", "nest",
    "rain", "red", "ring", "river", "road", "rock", "salt", "sand",
    "ship", "snow", "star", "stone", "sun", "tree", "wind", "wolf",
)  # fmt: skip

# (instruction, context, response) for one problem.
_Problem = tuple[str, str, str]


def _add(rng: random.Random) -> _Problem:
    # Small enough that a 3-layer model learns every sum (and every difference after it) within the demo's
    # budget: a bigger vocabulary spells each number as one token, so each pair is a fact to learn.
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    template = rng.choice(
        ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "What is the sum of {a} and {b}?")
    )
    return template.format(a=a, b=b), "", str(a + b)


def _compare(rng: random.Random) -> _Problem:
    a, b = rng.sample(range(100), 2)  # distinct, so the larger one is unambiguous
    template = rng.choice(
        (
            "Which is larger, {a} or {b}?",
            "Which number is bigger, {a} or {b}?",
            "Name the larger number: {a} or {b}.",
            "What is the maximum of {a} and {b}?",
        )
    )
    return template.format(a=a, b=b), "", str(max(a, b))


def _count_words(rng: random.Random) -> _Problem:
    words = rng.sample(_WORDS, rng.randint(1, 6))
    instruction = rng.choice(
        (
            "How many words are in the passage?",
            "Count the words in the passage.",
            "How many words does the passage contain?",
        )
    )
    return instruction, " ".join(words), str(len(words))


def _reverse_words(rng: random.Random) -> _Problem:
    words = rng.sample(_WORDS, rng.randint(2, 5))
    instruction = rng.choice(
        (
            "Reverse the order of the words in the passage.",
            "Write the words of the passage in reverse order.",
            "List the words in the passage from last to first.",
        )
    )
    return instruction, " ".join(words), " ".join(reversed(words))


def _sort_words(rng: random.Random) -> _Problem:
    words = rng.sample(_WORDS, rng.randint(2, 4))
    # Inline templates all end in ": <words>", so the input is the text after the last colon.
    template = rng.choice(
        (
            "Sort these words alphabetically: {words}",
            "Put these words in alphabetical order: {words}",
            "Arrange in alphabetical order: {words}",
        )
    )
    return template.format(words=" ".join(words)), "", " ".join(sorted(words))


def _first_word(rng: random.Random) -> _Problem:
    words = rng.sample(_WORDS, rng.randint(2, 6))
    instruction = rng.choice(
        (
            "What is the first word of the passage?",
            "Which word comes first in the passage?",
            "Give the first word in the passage.",
        )
    )
    return instruction, " ".join(words), words[0]


def _last_word(rng: random.Random) -> _Problem:
    words = rng.sample(_WORDS, rng.randint(2, 6))
    template = rng.choice(
        (
            "What is the last word in this list: {words}",
            "Give the final word of: {words}",
            "Which word comes last: {words}",
        )
    )
    return template.format(words=" ".join(words)), "", words[-1]


def _repeat_word(rng: random.Random) -> _Problem:
    word, times = rng.choice(_WORDS), rng.randint(1, 4)
    template = rng.choice(
        (
            'Repeat the word "{word}" {times} times.',
            'Write "{word}" {times} times.',
            'Say "{word}" {times} times, separated by spaces.',
        )
    )
    return template.format(word=word, times=times), "", " ".join([word] * times)


def _add_then_subtract(rng: random.Random) -> list[tuple[str, str]]:
    instruction, _, total = _add(rng)
    taken = rng.randint(0, int(total))
    follow = rng.choice(("And minus {n}?", "Now subtract {n}.", "Take {n} away from that."))
    return [(instruction, total), (follow.format(n=taken), str(int(total) - taken))]


def _sort_then_reverse(rng: random.Random) -> list[tuple[str, str]]:
    instruction, _, ordered = _sort_words(rng)
    follow = rng.choice(("Now reverse them.", "Now write them in reverse order.", "And from last to first?"))
    return [(instruction, ordered), (follow, " ".join(reversed(ordered.split())))]


_GENERATORS: dict[str, Callable[[random.Random], _Problem]] = {
    "add": _add,
    "compare": _compare,
    "count_words": _count_words,
    "reverse_words": _reverse_words,
    "sort_words": _sort_words,
    "first_word": _first_word,
    "last_word": _last_word,
    "repeat_word": _repeat_word,
}

# Two-turn tasks: (instruction, response) per turn.
_CONVERSATIONS: dict[str, Callable[[random.Random], list[tuple[str, str]]]] = {
    "add_then_subtract": _add_then_subtract,
    "sort_then_reverse": _sort_then_reverse,
}

TASK_KINDS: tuple[str, ...] = (*_GENERATORS, *_CONVERSATIONS)


def synthetic_records(n: int, *, seed: int) -> list[dict[str, Any]]:
    """Return `n` records, Dolly-schema ones and two-turn `messages` ones; the same `(n, seed)` always gives
    the same list.

    Kinds go round-robin so every mix of `n` is balanced and any `n >= len(TASK_KINDS)` covers all of them.
    """
    if n < 1:
        raise ValueError(f"dataset_size must be at least 1 for synthetic data, got {n}")
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for i in range(n):
        kind = TASK_KINDS[i % len(TASK_KINDS)]
        if kind in _CONVERSATIONS:
            messages = [
                {"role": role, "content": text}
                for turn in _CONVERSATIONS[kind](rng)
                for role, text in zip(("user", "assistant"), turn, strict=True)
            ]
            records.append({"messages": messages, "category": kind})
        else:
            instruction, context, response = _GENERATORS[kind](rng)
            records.append(
                {"instruction": instruction, "context": context, "response": response, "category": kind}
            )
    return records


def check_answer(record: dict[str, str], answer: str) -> bool:
    """Exact match of `answer` against the record's response, ignoring only surrounding whitespace.

    Deliberately strict (no case folding or punctuation stripping): every response is short and canonical, so
    anything else is a wrong answer.
    """
    return answer.strip() == record["response"]
