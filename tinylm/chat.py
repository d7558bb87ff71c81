"""The terminal chat: a thin loop over `Engine.stream` on the model's own prompt template."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

from tinylm.checkpoint import LoadedModel
from tinylm.config import ConfigError, SamplingConfig, apply_overrides
from tinylm.generate import Engine
from tinylm.prompts import DEFAULT_STOP_STRINGS, Turn, chat_prompt_budget, encode_chat, encode_prompt

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
    """One answer: its text, why it ended ("stop", "length", or "interrupted" by Ctrl-C), and its speed."""

    text: str
    finish_reason: str
    completion_tokens: int = 0
    tokens_per_sec: float = 0.0


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
        self.engine = Engine(loaded.model, loaded.tokenizer)
        self.sampling = sampling
        self.stop = (*DEFAULT_STOP_STRINGS, *stop)
        self.seed = seed
        self.history: list[Turn] = []

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
        prompt, dropped = encode_chat(
            tokenizer,
            self.history,
            question,
            context,
            max_prompt_tokens=chat_prompt_budget(window, self.sampling.max_new_tokens),
        )
        # encode_chat cuts the question itself only once every earlier turn is gone.
        cut = (
            len(encode_prompt(tokenizer, question, context)) - len(prompt)
            if dropped == len(self.history)
            else 0
        )
        if dropped:
            write(f"[dropped the {dropped} oldest turn(s) to fit the {window}-token context window]\n")
        if cut > 0:
            write(
                f"[cut {cut} tokens from the end of the question to fit the {window}-token context window]\n"
            )
        pieces: list[str] = []
        reply = Reply("", "interrupted")
        try:
            for chunk in self.engine.stream(prompt, self.sampling, stop=self.stop, seed=self.seed):
                write(chunk.text)
                pieces.append(chunk.text)  # after writing: history keeps what was shown
                if chunk.finish_reason:
                    reply = Reply("", chunk.finish_reason, chunk.completion_tokens, chunk.tokens_per_sec)
        except KeyboardInterrupt:
            pass
        answer = "".join(pieces).strip()
        self.history.append(Turn(question, answer, context))
        return replace(reply, text=answer)


def _status(reply: Reply) -> str:
    """The line after an answer: its length and speed, and why it ended when that was not its own choice."""
    if reply.finish_reason == "interrupted":
        return "[stopped]"
    line = f"[{reply.completion_tokens} tokens, {reply.tokens_per_sec:.1f} tokens/s"
    if reply.finish_reason == "length":
        line += "; cut at max_new_tokens (/set max_new_tokens N for longer answers)"
    return line + "]"


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
        session.history.clear()
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
