"""The terminal chat through scripted input: commands, settings, speed lines, a full window, and Ctrl-C.

The model is conftest's scripted one: it answers every prompt with "tiny model" and end-of-text.
"""

import io
import re
import signal
import subprocess
import sys
from dataclasses import replace

import pytest

from tinylm.chat import ChatSession, run_chat
from tinylm.checkpoint import load_model
from tinylm.generate import Chunk
from tinylm.prompts import TEMPLATE, chat_prompt_budget

SPEED_LINE = re.compile(r"\[(\d+) tokens in \d+\.\d\d s \(\d+\.\d tokens/s\); end of answer\]")


@pytest.fixture
def session(scripted_run) -> ChatSession:
    loaded = load_model(scripted_run.folder)  # a 256-token window, byte-level
    return ChatSession(loaded, replace(loaded.config.sampling, max_new_tokens=100))


def chat_through(session: ChatSession, script: str) -> str:
    stdout = io.StringIO()
    assert run_chat(session, stdin=io.StringIO(script), stdout=stdout) == 0
    return stdout.getvalue()


def test_answers_stream_with_a_speed_line_and_commands_work(session, scripted_run):
    out = chat_through(
        session,
        "hello\n/help\n/set temperature 0.5\n/set max-tokens 4\n/settings\nagain\n/reset\n/bogus\n/exit\n"
        "never read\n",
    )
    assert out.startswith("tinylm chat: ")
    first, second = out.split("tinylm> ")[1:3]
    assert first.startswith(f"{scripted_run.answer}\n[11 tokens in ")  # the answer's 10 bytes and end-of-text
    assert SPEED_LINE.search(first)
    assert "/set NAME VALUE" in out and "Ctrl-C stops the current answer" in out  # /help
    assert "[temperature = 0.5]" in out and "[max_new_tokens = 4]" in out
    assert "max_new_tokens=4, temperature=0.5," in out  # /settings
    assert second.startswith("tiny\n[4 tokens in ")  # cut at the new limit, and it says how to lift it
    assert "cut at max_new_tokens" in second
    assert "[conversation cleared]" in out and session.conversation.turns == []
    assert "unknown command /bogus; /help lists them" in out
    assert out.endswith("bye\n") and "never read" not in out


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("/set top_k abc", "error: /set: field sampling.top_k wants int, got 'abc'"),
        ("/set top_p 2", "error: config field sampling.top_p = 2.0 must be in (0, 1]"),
        ("/set colour blue", "error: unknown setting 'colour' (choose max_new_tokens, temperature,"),
        ("/set temperature", "error: /set temperature wants a value, e.g. /set temperature "),
        ("/set", "usage: /set NAME VALUE"),
        ("/set seed x", "error: /set: seed wants an integer or none, got 'x'"),
        (
            "/set repetition_penalty 1e-40",
            "error: config field sampling.repetition_penalty = 1e-40 must be between",
        ),
        ("/set temperature nan", "error: config field sampling.temperature = nan must be between 0 and 100"),
    ],
)
def test_bad_settings_are_one_line_errors_and_change_nothing(session, command, shown):
    before = (session.sampling, session.seed)
    out = chat_through(session, f"{command}\n/exit\n")
    assert shown in out
    assert (session.sampling, session.seed) == before


def test_set_seed_and_end_of_input_without_exit(session):
    out = chat_through(session, "/set seed 5\n/settings\nhello")  # no newline at the end, no /exit
    assert "[seed = 5]" in out and "seed=5" in out
    assert session.seed == 5 and len(session.conversation.turns) == 1
    assert out.endswith("bye\n")


def test_earlier_turns_are_in_the_prompt_until_the_window_is_full(session, monkeypatch):
    prompts: list[list[int]] = []
    real = session.engine.stream

    def recording(prompt_ids, sampling, **options):
        prompts.append(list(prompt_ids))
        return real(prompt_ids, sampling, **options)

    monkeypatch.setattr(session.engine, "stream", recording)
    questions = [f"question number {i}?" for i in range(6)]
    out = chat_through(session, "".join(q + "\n" for q in questions) + "/exit\n")
    tokenizer = session.loaded.tokenizer
    budget = chat_prompt_budget(256, 100)
    assert all(len(p) <= budget for p in prompts)
    assert tokenizer.decode(prompts[1]).count(TEMPLATE.instruction_header) == 2  # the first turn is carried
    assert "oldest turn(s) to fit the 256-token context window]" in out  # ...until it no longer fits
    last = tokenizer.decode(prompts[-1])
    assert last.startswith(TEMPLATE.instruction_header) and last.endswith(
        tokenizer.decode(TEMPLATE.encode_prompt(tokenizer, questions[-1]))
    )
    assert questions[0] not in last


def test_a_question_longer_than_the_window_is_cut_and_says_so(session):
    question = " ".join(["why"] * 100)
    out = chat_through(session, f"{question}\n/exit\n")
    cut = len(TEMPLATE.encode_prompt(session.loaded.tokenizer, question)) - chat_prompt_budget(256, 100)
    assert f"[cut {cut} tokens from the end of the question to fit the 256-token context window]" in out
    assert "tiny model" in out


def test_ctrl_c_in_the_middle_of_an_answer_stops_it_not_the_chat(session, monkeypatch):
    def interrupted(*args, **kwargs):
        yield Chunk("tiny ")
        raise KeyboardInterrupt

    monkeypatch.setattr(session.engine, "stream", interrupted)
    out = chat_through(session, "hello\n/settings\n/exit\n")
    assert "tinylm> tiny \n[stopped]\n" in out
    assert "temperature=" in out and out.endswith("bye\n")  # the chat carried on
    assert [t.response for t in session.conversation.turns] == ["tiny"]  # the partial answer is remembered


def test_ctrl_c_while_an_answer_is_being_written_stops_it(session):
    written: list[str] = []

    def write(text: str) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(text)

    reply = session.ask("hello", write)
    assert reply.finish_reason == "interrupted"
    assert reply.text == "".join(written).strip()
    assert session.ask("hello", lambda _: None).finish_reason == "stop"  # the next answer is whole


def test_ctrl_c_at_the_prompt_gives_a_fresh_line(session):
    class InterruptedOnce(io.StringIO):
        interrupted = False

        def readline(self, *args):
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            return super().readline(*args)

    stdout = io.StringIO()
    assert run_chat(session, stdin=InterruptedOnce("hello\n/exit\n"), stdout=stdout) == 0
    assert "parameters). /help for commands.\n\ntinylm> tiny model" in stdout.getvalue()


def test_sigint_to_a_real_chat_process_does_not_end_it(scripted_run, repo_root, offline_env):
    process = subprocess.Popen(
        [sys.executable, "-m", "tinylm", "chat", "--checkpoint", str(scripted_run.folder)],
        cwd=repo_root,
        env=offline_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A job started in the background by a non-interactive shell (as CI may be) inherits SIGINT
        # ignored, and Python then installs no Ctrl-C handler; give the chat the terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout.readline().startswith("tinylm chat: ")
        process.stdin.write("/settings\n")
        process.stdin.flush()
        assert "temperature=" in process.stdout.readline()  # it answered: now it waits at the prompt
        process.send_signal(signal.SIGINT)
        assert process.stdout.readline() == "\n"  # it took the Ctrl-C: a fresh line, then the prompt again
        out, err = process.communicate("hello\n/exit\n", timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert f"tinylm> {scripted_run.answer}\n" in out and out.endswith("bye\n")


def test_settings_at_their_limits_answer_and_the_session_lives_on(session, scripted_run):
    # A vanishing temperature is greedy, and a huge token limit costs nothing until tokens are made.
    out = chat_through(
        session, "/set temperature 1e-40\n/set max_new_tokens 1000000000000\nhello\nagain\n/exit\n"
    )
    assert out.count(f"tinylm> {scripted_run.answer}\n[11 tokens in ") == 2
