"""The terminal chat: a thin loop over `Engine.stream` on the model's own prompt template."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

from tinylm.checkpoint import LoadedModel
from tinylm.config import ConfigError, SamplingConfig, apply_overrides
from tinylm.conversation import Conversation, answer_status, fit_notice
from tinylm.generate import Chunk, Engine
from tinylm.prompts import TEMPLATE

HELP = """commands:
  /help               this list
  /reset              forget the conversation
  /set NAME VALUE     change a setting, e.g. /set temperature 0.7 (names: /settings)
  /settings           show the settings
  /exit               leave (Ctrl-D works too)
Ctrl-C stops the current answer."""

# The command-line flags' spellings, so `/set max-tokens 50` works as well as `/set max_new_tokens 50`.
_ALIASES = {"max_tokens": "max_new_tokens"}


@dataclass(frozen=True)
class Reply:
    """One answer: its text and its stream's last chunk (the counts and why it ended; None after Ctrl-C)."""

    text: str
    last: Chunk | None = None

    @property
    def finish_reason(self) -> str:
        """ "stop", "length", or "interrupted" by Ctrl-C."""
        return (self.last and self.last.finish_reason) or "interrupted"


class ChatSession:
    """A conversation and its settings; `ask` streams one answer and remembers the turn."""

    def __init__(
        self,
        loaded: LoadedModel,
        sampling: SamplingConfig,
        *,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ):
        self.loaded = loaded
        self.engine = Engine(loaded.model, loaded.tokenizer)
        self.sampling = sampling
        self.stop = (*TEMPLATE.stop_strings, *stop)
        self.seed = seed
        self.conversation = Conversation()

    def settings(self) -> dict[str, object]:
        return {**dataclasses.asdict(self.sampling), "seed": self.seed}

    def set(self, name: str, value: str) -> str:
        """Change one setting from its text form; returns the field's name. Bad input raises ConfigError."""
        name = name.replace("-", "_")
        name = _ALIASES.get(name, name)
        if name == "seed":
            try:
                self.seed = None if value.strip().lower() in ("", "none") else int(value)
            except ValueError:
                raise ConfigError(f"/set: seed wants an integer or none, got {value!r}") from None
            return name
        if name not in {f.name for f in dataclasses.fields(SamplingConfig)}:
            raise ConfigError(f"unknown setting {name!r} (choose {', '.join(self.settings())})")
        if not value.strip():
            raise ConfigError(f"/set {name} wants a value, e.g. /set {name} {getattr(self.sampling, name)}")
        current = replace(self.loaded.config, sampling=self.sampling)
        self.sampling = (
            apply_overrides(current, {f"sampling.{name}": value}, origin="/set").validate().sampling
        )
        return name

    def ask(self, question: str, write: Callable[[str], None], *, context: str = "") -> Reply:
        """Stream an answer through `write` and remember the turn. Ctrl-C ends the answer early."""
        tokenizer, window = self.loaded.tokenizer, self.loaded.config.model.max_seq_length
        fitted = self.conversation.prompt(
            tokenizer, question, context, window=window, max_new_tokens=self.sampling.max_new_tokens
        )
        if notice := fit_notice(fitted, window):
            write(f"[{notice}]\n")
        prompt = fitted.ids
        epoch = self.conversation.ask(question, context)
        pieces: list[str] = []
        last: Chunk | None = None
        try:
            for chunk in self.engine.stream(prompt, self.sampling, stop=self.stop, seed=self.seed):
                write(chunk.text)
                pieces.append(chunk.text)  # after writing: history keeps what was shown
                if chunk.finish_reason:
                    last = chunk
        except KeyboardInterrupt:
            pass
        answer = "".join(pieces).strip()
        self.conversation.answer(epoch, answer)
        return Reply(answer, last)


def _status(reply: Reply) -> str:
    """The line after an answer, with how to lift the limit when it cut the answer short."""
    hint = " (/set max_new_tokens N for longer answers)" if reply.finish_reason == "length" else ""
    return f"[{answer_status(reply.last)}{hint}]"


def run_chat(session: ChatSession, *, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Read questions and commands line by line until /exit or end of input. Ctrl-C never ends it."""

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    interactive = stdin.isatty()
    parameters = session.loaded.model.num_parameters()
    write(f"tinylm chat: {session.loaded.path} ({parameters:,} parameters). /help for commands.\n")
    while True:
        try:
            if interactive:
                write("\nyou> ")
            line = stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command in ("/exit", "/quit"):
                    break
                write(_command(session, command, rest.strip()) + "\n")
                continue
            write("tinylm> ")
            reply = session.ask(line, write)
            write(f"\n{_status(reply)}\n")
        except KeyboardInterrupt:  # outside an answer (at the prompt, say): a fresh line, not an exit
            write("\n")
    write("bye\n")
    return 0


def _command(session: ChatSession, command: str, rest: str) -> str:
    """Carry out one slash command (other than /exit) and return what to show."""
    if command == "/help":
        return HELP
    if command == "/reset":
        session.conversation.clear()
        return "[conversation cleared]"
    if command == "/settings":
        return ", ".join(f"{k}={v}" for k, v in session.settings().items())
    if command == "/set":
        name, _, value = rest.partition(" ")
        if not name:
            return "usage: /set NAME VALUE, e.g. /set temperature 0.7"
        try:
            field = session.set(name, value)
        except ConfigError as exc:
            return f"error: {exc}"
        return f"[{field} = {session.settings()[field]}]"
    return f"unknown command {command}; /help lists them"
