"""One conversation for the terminal chat and the web page: its turns, its next prompt, and the words both
front ends show about fitting a prompt into the window and about a finished answer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import ClassVar

from tinylm.generate import Chunk
from tinylm.prompts import TEMPLATE, EncodedPrompt, TextTokenizer, Turn, chat_prompt_budget


@dataclass
class Conversation:
    """The turns so far, the latest one's answer still growing while it streams.

    A web page hands this same object to every event of a tab, so Clear, or a newer question, is seen at
    once by an answer still streaming: each moves `epoch` on, and the old answer's next update is refused
    (the answer then shows the conversation as it now is, and stops).
    """

    turns: list[Turn] = field(default_factory=list)
    epoch: int = 0
    # One lock for all conversations: the critical sections are a few assignments.
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def prompt(
        self, tokenizer: TextTokenizer, question: str, context: str = "", *, window: int, max_new_tokens: int
    ) -> EncodedPrompt:
        """The prompt for a next question after the turns so far, leaving the answer room in the window."""
        with self._lock:
            turns = list(self.turns)
        budget = chat_prompt_budget(window, max_new_tokens)
        return TEMPLATE.encode_chat(tokenizer, turns, question, context, max_prompt_tokens=budget)

    def ask(self, question: str, context: str = "") -> int:
        """Start a turn; returns the epoch its answer must quote to `answer`."""
        with self._lock:
            self.epoch += 1
            self.turns = [*self.turns, Turn(question, "", context)]
            return self.epoch

    def answer(self, epoch: int, text: str) -> bool:
        """Set the latest turn's answer so far; False if the conversation has moved on since `ask`."""
        with self._lock:
            if epoch != self.epoch:
                return False
            self.turns[-1] = replace(self.turns[-1], response=text)
            return True

    def clear(self) -> None:
        with self._lock:
            self.epoch += 1
            self.turns = []


def fit_notice(prompt: EncodedPrompt, window: int) -> str:
    """What fitting the prompt into the window left out, in one sentence; empty when nothing was."""
    left_out = []
    if prompt.dropped_turns:
        left_out.append(f"dropped the {prompt.dropped_turns} oldest turn(s)")
    if prompt.cut_tokens:
        left_out.append(f"cut {prompt.cut_tokens} tokens from the end of the question")
    return f"{' and '.join(left_out)} to fit the {window}-token context window" if left_out else ""


def answer_status(last: Chunk | None) -> str:
    """The line after an answer from its stream's last chunk (None: the user stopped it): its length, its
    speed, and why it ended."""
    if last is None or last.finish_reason is None:
        return "stopped"
    why = "cut at max_new_tokens" if last.finish_reason == "length" else "end of answer"
    return (
        f"{last.completion_tokens} tokens in {last.seconds:.2f} s ({last.tokens_per_sec:.1f} tokens/s); {why}"
    )
