"""The one prompt template: training data, the terminal, the web page and the API all render through it.

A record becomes::

    ### Instruction:
    {instruction}

    ### Context:          <- only when a context passage is given
    {context}

    ### Response:
    {response}<|endoftext|>

Pieces are tokenized separately and concatenated, so the prompt tokens a model sees at inference are
exactly the ones it was trained on, whatever the tokenizer merges across piece boundaries.

Truncation rule for a record longer than the window (max_seq_length + 1 tokens, since inputs and targets
are the sequence shifted by one): the prompt is cut only as much as needed, but never below half the
window, by trimming the end of the context passage first and then the end of the instruction (the section
headers always stay); then the response is cut at the end of the window. The response's start is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Bump when the template or the truncation rule changes what tokens a record becomes: the tokenized-data
# cache is keyed by it.
TEMPLATE_VERSION = 1
INSTRUCTION_HEADER = "### Instruction:\n"
CONTEXT_HEADER = "\n\n### Context:\n"
RESPONSE_HEADER = "\n\n### Response:\n"
# The model may run on into a new turn instead of ending with end-of-text; front ends stop there too.
DEFAULT_STOP_STRINGS: tuple[str, ...] = ("### Instruction:",)


class TextTokenizer(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Turn:
    """One finished exchange of a chat, kept so later prompts carry the conversation."""

    instruction: str
    response: str
    context: str = ""


@dataclass(frozen=True)
class EncodedExample:
    tokens: list[int]
    # loss_mask[i] says whether tokens[i] is a prediction target (so position 0 is never one).
    loss_mask: list[bool]


def _trim(pieces: list[list[int]], excess: int, order: Sequence[int]) -> None:
    """Drop `excess` tokens from the ends of pieces, in the given order of pieces, in place."""
    for index in order:
        if excess <= 0:
            return
        cut = min(excess, len(pieces[index]))
        pieces[index] = pieces[index][: len(pieces[index]) - cut]
        excess -= cut


def encode_prompt(
    tokenizer: TextTokenizer, instruction: str, context: str = "", *, budget: int | None = None
) -> list[int]:
    """Token ids of the prompt up to and including the response header, trimmed to `budget` if given."""
    pieces = [tokenizer.encode(INSTRUCTION_HEADER), tokenizer.encode(instruction)]
    if context.strip():
        pieces += [tokenizer.encode(CONTEXT_HEADER), tokenizer.encode(context)]
    pieces.append(tokenizer.encode(RESPONSE_HEADER))
    if budget is not None:
        # Context text first (index 3), then instruction text (index 1); headers are never cut.
        _trim(pieces, sum(map(len, pieces)) - budget, (3, 1) if len(pieces) == 5 else (1,))
    return [t for piece in pieces for t in piece]


def encode_example(
    tokenizer: TextTokenizer,
    instruction: str,
    context: str,
    response: str,
    *,
    max_seq_length: int,
    train_on_prompt: bool = False,
) -> EncodedExample:
    """Tokens and loss mask of one training record, truncated by the rule in the module docstring."""
    window = max_seq_length + 1
    answer = [*tokenizer.encode(response), tokenizer.eos_id]
    prompt = encode_prompt(tokenizer, instruction, context)
    if len(prompt) + len(answer) > window:
        prompt = encode_prompt(tokenizer, instruction, context, budget=max(window - len(answer), window // 2))
    tokens = (prompt + answer)[:window]
    loss_mask = [train_on_prompt and i > 0 for i in range(len(prompt))] + [True] * (len(tokens) - len(prompt))
    return EncodedExample(tokens=tokens, loss_mask=loss_mask[: len(tokens)])


def chat_prompt_budget(window: int, max_new_tokens: int) -> int:
    """Tokens a prompt may take so that the answer has room: max_new_tokens, at most half the window.

    Every front end sizes its prompts with this, a conversation's (terminal, web page) or a one-shot
    question's (`tinylm generate`): training, too, kept at least half the window for the prompt.
    """
    return window - max(1, min(max_new_tokens, window // 2))


def fit_prompt(
    tokenizer: TextTokenizer, instruction: str, context: str = "", *, max_prompt_tokens: int
) -> tuple[list[int], int]:
    """A one-shot prompt cut to max_prompt_tokens as training cut long records; also how many tokens went.

    The end of the context passage goes first, then the end of the instruction; the headers, and so the
    closing "### Response:" that asks for the answer, always stay.
    """
    whole = encode_prompt(tokenizer, instruction, context)
    if len(whole) <= max_prompt_tokens:
        return whole, 0
    cut = encode_prompt(tokenizer, instruction, context, budget=max_prompt_tokens)
    return cut, len(whole) - len(cut)


def encode_chat(
    tokenizer: TextTokenizer,
    history: Sequence[Turn],
    instruction: str,
    context: str = "",
    *,
    max_prompt_tokens: int,
) -> tuple[list[int], int]:
    """Prompt ids for a new question after earlier turns, dropping the oldest turns to fit.

    Returns the ids and how many of the oldest turns were dropped. Earlier answers end with end-of-text,
    as every training response does.
    """
    current, cut = fit_prompt(tokenizer, instruction, context, max_prompt_tokens=max_prompt_tokens)
    if cut:
        return current, len(history)
    turns = [
        [*encode_prompt(tokenizer, t.instruction, t.context), *tokenizer.encode(t.response), tokenizer.eos_id]
        for t in history
    ]
    dropped = 0
    while turns and sum(map(len, turns)) + len(current) > max_prompt_tokens:
        turns.pop(0)
        dropped += 1
    return [t for turn in turns for t in turn] + current, dropped
