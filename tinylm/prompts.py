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


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's ids and what fitting it into its budget took, so no front end has to work it out again."""

    ids: list[int]
    # The oldest earlier turns left out; all of them whenever the question itself had to be cut.
    dropped_turns: int = 0
    # Tokens cut from the end of the question's context passage, then of its instruction.
    cut_tokens: int = 0


def _trim(pieces: list[list[int]], excess: int, order: Sequence[int]) -> None:
    """Drop `excess` tokens from the ends of pieces, in the given order of pieces, in place."""
    for index in order:
        if excess <= 0:
            return
        cut = min(excess, len(pieces[index]))
        pieces[index] = pieces[index][: len(pieces[index]) - cut]
        excess -= cut


@dataclass(frozen=True)
class PromptTemplate:
    """The section headers a record is rendered with, the template's version and its stop strings."""

    instruction_header: str = "### Instruction:\n"
    context_header: str = "\n\n### Context:\n"
    response_header: str = "\n\n### Response:\n"
    # Bump when the headers or the truncation rule change what tokens a record becomes: the tokenized-data
    # cache (and a trained BPE's) is keyed by it.
    version: int = 1
    # The model may run on into a new turn instead of ending with end-of-text; front ends stop there too.
    stop_strings: tuple[str, ...] = ("### Instruction:",)

    def render(self, instruction: str, context: str = "", response: str = "") -> str:
        """The text of a record (the prompt alone when response is empty): what a BPE learns merges from."""
        return "".join(self._texts(instruction, context)) + response

    def _texts(self, instruction: str, context: str) -> list[str]:
        """The prompt's pieces, each tokenized on its own; a blank context passage is left out."""
        texts = [self.instruction_header, instruction]
        if context.strip():
            texts += [self.context_header, context]
        return [*texts, self.response_header]

    def encode_prompt(
        self, tokenizer: TextTokenizer, instruction: str, context: str = "", *, budget: int | None = None
    ) -> list[int]:
        """Token ids of the prompt up to and including the response header, trimmed to `budget` if given."""
        pieces = [tokenizer.encode(text) for text in self._texts(instruction, context)]
        if budget is not None:
            # Context text first (index 3), then instruction text (index 1); headers are never cut.
            _trim(pieces, sum(map(len, pieces)) - budget, (3, 1) if len(pieces) == 5 else (1,))
        return [t for piece in pieces for t in piece]

    def encode_example(
        self,
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
        prompt = self.encode_prompt(tokenizer, instruction, context)
        if len(prompt) + len(answer) > window:
            budget = max(window - len(answer), window // 2)
            prompt = self.encode_prompt(tokenizer, instruction, context, budget=budget)
        tokens = (prompt + answer)[:window]
        loss_mask = [train_on_prompt and i > 0 for i in range(len(prompt))]
        loss_mask += [True] * (len(tokens) - len(prompt))
        return EncodedExample(tokens=tokens, loss_mask=loss_mask[: len(tokens)])

    def encode_chat(
        self,
        tokenizer: TextTokenizer,
        history: Sequence[Turn],
        instruction: str,
        context: str = "",
        *,
        max_prompt_tokens: int | None,
    ) -> EncodedPrompt:
        """Prompt ids for a question after earlier turns (none for a one-shot question), fitted to
        max_prompt_tokens (None: no limit).

        The oldest turns go first; only when the question alone is too long is it cut, as training cut long
        records: the end of the context passage, then the end of the instruction, the headers (and so the
        closing "### Response:" that asks for the answer) always staying. Earlier answers end with
        end-of-text, as every training response does.
        """
        question = self.encode_prompt(tokenizer, instruction, context)
        if max_prompt_tokens is not None and len(question) > max_prompt_tokens:
            cut = self.encode_prompt(tokenizer, instruction, context, budget=max_prompt_tokens)
            return EncodedPrompt(cut, dropped_turns=len(history), cut_tokens=len(question) - len(cut))
        turns = [
            [
                *self.encode_prompt(tokenizer, t.instruction, t.context),
                *tokenizer.encode(t.response),
                tokenizer.eos_id,
            ]
            for t in history
        ]
        dropped = 0
        if max_prompt_tokens is not None:
            while turns and sum(map(len, turns)) + len(question) > max_prompt_tokens:
                turns.pop(0)
                dropped += 1
        return EncodedPrompt([t for turn in turns for t in turn] + question, dropped_turns=dropped)


TEMPLATE = PromptTemplate()


def chat_prompt_budget(window: int, max_new_tokens: int) -> int:
    """Tokens a prompt may take so that the answer has room: max_new_tokens, at most half the window.

    Every front end sizes its prompts with this, a conversation's (terminal, web page) or a one-shot
    question's (`tinylm generate`): training, too, kept at least half the window for the prompt.
    """
    return window - max(1, min(max_new_tokens, window // 2))
