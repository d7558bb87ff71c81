"""The terminal chat: a thin loop over `generate.stream` on the model's own prompt template."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from tinylm.checkpoint import LoadedModel
from tinylm.config import ConfigError, SamplingConfig, apply_overrides
from tinylm.generate import stream
from tinylm.prompts import DEFAULT_STOP_STRINGS, Turn, chat_prompt_budget, encode_chat

HELP = """commands:
  /help               this list
  /reset              forget the conversation
  /set NAME VALUE     change a sampling setting, e.g. /set temperature 0.7
  /settings           show the sampling settings
  /exit               leave (Ctrl-D works too)
Ctrl-C stops the current answer."""


class ChatSession:
    """A conversation's history and settings; `ask` streams one answer and remembers the turn."""

    def __init__(
        self,
        loaded: LoadedModel,
        sampling: SamplingConfig,
        *,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ):
        self.loaded = loaded
        self.sampling = sampling
        self.stop = (*DEFAULT_STOP_STRINGS, *stop)
        self.seed = seed
        self.history: list[Turn] = []

    def set(self, name: str, value: str) -> None:
        names = {f.name for f in dataclasses.fields(SamplingConfig)}
        if name not in names:
            raise ConfigError(f"unknown setting {name!r} (choose {', '.join(sorted(names))})")
        current = replace(self.loaded.config, sampling=self.sampling)
        self.sampling = (
            apply_overrides(current, {f"sampling.{name}": value}, origin="/set").validate().sampling
        )

    def ask(self, question: str, write: Callable[[str], None], *, context: str = "") -> tuple[str, float]:
        """Stream an answer through `write`; returns the answer and its tokens/s. Ctrl-C ends it early."""
        window = self.loaded.config.model.max_seq_length
        prompt, dropped = encode_chat(
            self.loaded.tokenizer,
            self.history,
            question,
            context,
            max_prompt_tokens=chat_prompt_budget(window, self.sampling.max_new_tokens),
        )
        if dropped:
            write(f"[dropped the {dropped} oldest turn(s) to fit the {window}-token context window]\n")
        pieces: list[str] = []
        speed = 0.0
        try:
            for chunk in stream(
                self.loaded.model,
                self.loaded.tokenizer,
                prompt,
                self.sampling,
                stop=self.stop,
                seed=self.seed,
            ):
                pieces.append(chunk.text)
                write(chunk.text)
                if chunk.finish_reason:
                    speed = chunk.tokens_per_sec
        except KeyboardInterrupt:
            write(" [stopped]")
        answer = "".join(pieces).strip()
        self.history.append(Turn(question, answer, context))
        return answer, speed


def run_chat(session: ChatSession, *, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Read questions and commands line by line until /exit or end of input."""

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    interactive = stdin.isatty()
    parameters = session.loaded.model.num_parameters()
    write(f"tinylm chat: {session.loaded.path} ({parameters:,} parameters). /help for commands.\n")
    while True:
        if interactive:
            write("\nyou> ")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            write("\n")
            continue
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/help":
                write(HELP + "\n")
            elif command == "/reset":
                session.history.clear()
                write("[conversation cleared]\n")
            elif command == "/settings":
                write(", ".join(f"{k}={v}" for k, v in dataclasses.asdict(session.sampling).items()) + "\n")
            elif command == "/set":
                name, _, value = rest.strip().partition(" ")
                try:
                    session.set(name, value)
                    write(f"[{name} = {getattr(session.sampling, name)}]\n")
                except ConfigError as exc:
                    write(f"error: {exc}\n")
            else:
                write(f"unknown command {command}; /help lists them\n")
            continue
        write("tinylm> ")
        _, speed = session.ask(line, write)
        write(f"\n[{speed:.1f} tokens/s]\n")
    write("bye\n")
    return 0
