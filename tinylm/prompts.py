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

A conversation is its turns one after the other, each rendered as above and ending with end-of-text: the
same tokens whether it is a training record or the earlier turns of a chat prompt. One that does not fit
the window loses whole turns, oldest first, as a chat prompt does; a last turn too long on its own is cut
by the rule above. Messages in OpenAI's roles become turns through `conversation_turns`, for training data
and the HTTP API alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
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


class ConversationError(ValueError):
    """Messages that do not make a conversation the template can render; the message says why."""


# The roles `conversation_turns` reads; developer is OpenAI's newer name for system.
CONTEXT_ROLES = ("system", "developer")
ROLES = (*CONTEXT_ROLES, "user", "assistant")


def conversation_turns(messages: Iterable[tuple[str, str]], *, answered: bool) -> list[Turn]:
    """(role, content) messages as the template's turns.

    Consecutive messages of one role are joined by a blank line. The template has no slot for a system
    prompt but one for a context passage, so the system (and developer) messages, joined, become the
    context passage of the last user turn. A conversation starts with a user message and ends with an
    assistant's when `answered` (a training record: every turn has its response) or with a user's when not
    (a prompt: the last turn's response is empty, for the model to write).
    """
    context: list[str] = []
    dialogue: list[list[str]] = []  # [role, content]
    for role, content in messages:
        if role not in ROLES:
            raise ConversationError(f"unknown role {role!r} (use {', '.join(ROLES)})")
        if role in CONTEXT_ROLES:
            context.append(content)
        elif dialogue and dialogue[-1][0] == role:
            dialogue[-1][1] += f"\n\n{content}"
        else:
            dialogue.append([role, content])
    last = "assistant" if answered else "user"
    if not dialogue or dialogue[-1][0] != last:
        raise ConversationError(f"the last message (system messages aside) must be the {last}'s")
    if dialogue[0][0] != "user":
        raise ConversationError("the conversation must start with a user message")
    answers = [content for _, content in dialogue[1::2]] + ([] if answered else [""])
    turns = [Turn(q, a) for (_, q), a in zip(dialogue[0::2], answers, strict=True)]
    turns[-1] = replace(turns[-1], context="\n\n".join(context))
    return turns


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
    # Bump when the headers, the truncation rule or the rendering of conversations change what tokens a
    # record becomes: the tokenized-data cache (and a trained BPE's) is keyed by it.
    version: int = 2
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

    def encode_turn(self, tokenizer: TextTokenizer, turn: Turn) -> tuple[list[int], list[int]]:
        """(prompt, answer) ids of one finished turn, the answer ending with end-of-text: how a turn reads
        in a training conversation and among a chat prompt's earlier turns."""
        prompt = self.encode_prompt(tokenizer, turn.instruction, turn.context)
        return prompt, [*tokenizer.encode(turn.response), tokenizer.eos_id]

    def encode_conversation(
        self,
        tokenizer: TextTokenizer,
        turns: Sequence[Turn],
        *,
        max_seq_length: int,
        train_on_prompt: bool = False,
    ) -> EncodedExample:
        """Tokens and loss mask of a training conversation: every answer (and its end-of-text) counts, the
        prompts only with `train_on_prompt`. One turn is `encode_example`'s record. Too long for the window,
        it drops whole turns, oldest first, as a chat prompt does; a last turn too long alone is cut as
        `encode_example` cuts a record."""
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        window = max_seq_length + 1
        pieces = [self.encode_turn(tokenizer, t) for t in turns]
        sizes = [len(prompt) + len(answer) for prompt, answer in pieces]
        if sizes[-1] > window:
            last = turns[-1]
            return self.encode_example(
                tokenizer,
                last.instruction,
                last.context,
                last.response,
                max_seq_length=max_seq_length,
                train_on_prompt=train_on_prompt,
            )
        first = len(turns) - 1
        while first > 0 and sum(sizes[first - 1 :]) <= window:
            first -= 1
        tokens: list[int] = []
        loss_mask: list[bool] = []
        for prompt, answer in pieces[first:]:
            tokens += prompt + answer
            loss_mask += [train_on_prompt] * len(prompt) + [True] * len(answer)
        loss_mask[0] = False
        return EncodedExample(tokens=tokens, loss_mask=loss_mask)

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
        turns = [[t for piece in self.encode_turn(tokenizer, turn) for t in piece] for turn in history]
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
