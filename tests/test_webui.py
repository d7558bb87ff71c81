"""The web page through Gradio's own client, against the app served in-process on a free port.

The model is the scripted one from conftest (it answers every prompt with the same words), so what is
checked is the page: streaming, per-session histories, the prompt it builds, the model panel, errors.
"""

import io
import itertools
import json
import socket

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from tinylm import cli
from tinylm.chat import ChatSession
from tinylm.checkpoint import CheckpointError, ModelStore, find_checkpoints, load_model
from tinylm.conversation import Conversation
from tinylm.generate import Engine
from tinylm.prompts import TEMPLATE, Turn, chat_prompt_budget
from tinylm.tokenizer import ByteTokenizer
from tinylm.webui import FAILED, build_app, launch, loss_curve

TOK = ByteTokenizer()


def said(chatbot: list[dict]) -> list[tuple[str, str]]:
    """(role, text) of each message the Chatbot shows."""
    return [(m["role"], "".join(part.get("text", "") for part in m["content"])) for m in chatbot]


def ask(client: Client, question: str, context: str = "", **sampling):
    job = client.submit(question=question, context=context, api_name="/chat", **sampling)
    job.result(timeout=60)
    return job


def test_a_question_gets_a_streamed_answer(webui_url, scripted_run):
    job = ask(Client(webui_url, verbose=False), "What are you?")
    updates = job.outputs()
    # The first update empties the boxes and shows the question at once.
    assert updates[0][:2] == ("", "")
    assert said(updates[0][2]) == [("user", "What are you?"), ("assistant", "")]
    answers = [said(update[2])[-1][1] for update in updates]
    assert answers[-1] == scripted_run.answer
    # Piece by piece: the answer shown grows through several prefixes, never changing what was shown.
    assert len(set(answers)) > 3
    assert all(b.startswith(a) for a, b in itertools.pairwise(answers))
    assert updates[-1][3].endswith("tokens/s); end of answer")


def test_two_sessions_keep_separate_histories(webui_url, scripted_run, generations):
    tab_a, tab_b = Client(webui_url, verbose=False), Client(webui_url, verbose=False)
    # Both tabs ask at the same time, twice.
    for round_ in ("first", "second"):
        jobs = [
            tab.submit(question=f"{round_} from {name}", context="", api_name="/chat")
            for tab, name in ((tab_a, "A"), (tab_b, "B"))
        ]
        last = [job.result(timeout=60) for job in jobs]
    answer = scripted_run.answer
    for shown, name in zip(last, "AB", strict=True):
        assert said(shown[2]) == [
            ("user", f"first from {name}"),
            ("assistant", answer),
            ("user", f"second from {name}"),
            ("assistant", answer),
        ]
    prompts = {TOK.decode(ids) for ids, _ in generations[2:]}
    for name, other in (("A", "B"), ("B", "A")):
        [prompt] = [p for p in prompts if f"second from {name}" in p]
        assert f"first from {name}" in prompt and f"from {other}" not in prompt


def test_the_context_passage_reaches_the_prompt(webui_url, generations):
    client = Client(webui_url, verbose=False)
    shown = ask(client, "What colour is the sky?", "The sky is green today.").outputs()[-1]
    [(prompt, _)] = generations
    assert prompt == TEMPLATE.encode_prompt(TOK, "What colour is the sky?", "The sky is green today.")
    assert said(shown[2])[0] == ("user", "What colour is the sky?\n\n> The sky is green today.")


def test_a_question_too_long_for_the_window_is_cut_and_both_front_ends_say_so_alike(webui_url, scripted_run):
    question = " ".join(["why"] * 100)
    web = Client(webui_url, verbose=False)
    ask(web, "Hello?")
    status = ask(web, question).outputs()[-1][3]
    loaded = load_model(scripted_run.folder)  # the page's first checkpoint, with the sliders' defaults
    session, terminal = ChatSession(loaded, loaded.config.sampling), io.StringIO()
    session.ask("Hello?", terminal.write)
    session.ask(question, terminal.write)
    cut = len(TEMPLATE.encode_prompt(TOK, question)) - chat_prompt_budget(256, 100)
    notice = (
        f"dropped the 1 oldest turn(s) and cut {cut} tokens from the end of the question to fit the "
        "256-token context window"
    )
    assert status.endswith(f"; end of answer; {notice}")
    assert f"{scripted_run.answer}[{notice}]\n{scripted_run.answer}" in terminal.getvalue()


def test_sampling_controls_reach_the_generator_and_clear_forgets(webui_url, generations):
    client = Client(webui_url, verbose=False)
    ask(client, "Hello?", temperature=0.7, top_k=5, top_p=0.5, repetition_penalty=1.3, max_new_tokens=12)
    sampling = generations[0][1]
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.7, 5, 0.5)
    assert (sampling.repetition_penalty, sampling.max_new_tokens) == (1.3, 12)
    assert said(client.predict(api_name="/clear")[0]) == []
    ask(client, "Again?")
    assert generations[1][0] == TEMPLATE.encode_prompt(TOK, "Again?")


def test_model_panel_describes_the_chosen_checkpoint(webui_url, scripted_run):
    latest = scripted_run.folder / "latest.pt"
    card, curve = Client(webui_url, verbose=False, download_files=False).predict(
        str(latest), api_name="/model"
    )
    assert str(latest) in card
    assert "**training steps:** 60" in card
    assert "**best validation loss:** 1.2500" in card
    assert "**parameters:** 33,857" in card
    assert "**tokenizer:** byte (257 tokens)" in card
    assert curve["visible"] and curve["value"]["path"].endswith(".png")
    answer = ask(Client(webui_url, verbose=False), "Hi?", checkpoint=str(latest)).outputs()[-1]
    assert said(answer[2])[-1] == ("assistant", scripted_run.answer)


def test_loss_curve_prefers_the_runs_png_and_draws_metrics_otherwise(tmp_path):
    assert loss_curve(tmp_path) is None
    lines = [json.dumps({"step": s, "loss": 3.0 / s}) for s in range(1, 20)] + [
        json.dumps({"step": 10, "val_loss": 0.5})
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 20, "lo', encoding="utf-8")
    drawn = loss_curve(tmp_path)
    assert drawn is not None and drawn.ndim == 3 and drawn.shape[2] == 3 and drawn.std() > 0
    pixels = np.zeros((8, 12, 3), dtype=np.uint8)
    pixels[:, :6] = 200
    Image.fromarray(pixels).save(tmp_path / "loss.png")
    assert np.array_equal(loss_curve(tmp_path), pixels)


def test_find_checkpoints_lists_a_run_folder_and_a_folder_of_runs(tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    for name in ("checkpoint_step_1000.pt", "latest.pt", "checkpoint_step_500.pt", "best_model.pt"):
        (run / name).touch()
    names = ["best_model.pt", "latest.pt", "checkpoint_step_500.pt", "checkpoint_step_1000.pt"]
    assert find_checkpoints(run) == [run / n for n in names]
    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "runs" / "other" / "latest.pt").touch()
    assert find_checkpoints(tmp_path / "runs") == [run / "best_model.pt", tmp_path / "runs/other/latest.pt"]
    assert find_checkpoints(run / "latest.pt") == [run / "latest.pt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: folder holds no checkpoints"):
        find_checkpoints(tmp_path / "empty")


@pytest.mark.parametrize("problem", ["missing", "broken"])
def test_ui_refuses_a_bad_checkpoint_in_one_line_before_starting(tmp_path, capsys, problem):
    path = tmp_path / "model.pt"
    if problem == "broken":
        path.write_bytes(b"not a checkpoint")
    assert cli.main(["ui", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") or err.startswith(f"error: checkpoint {path}")
    assert err.count("\n") == 1


def test_clear_or_a_newer_question_stops_an_answer_from_writing_back():
    conversation = Conversation()
    first = conversation.ask("First?", "")
    assert conversation.answer(first, "par")
    assert conversation.turns == [Turn("First?", "par")]
    second = conversation.ask("Second?", "ctx")
    assert not conversation.answer(first, "partial")  # superseded: the first answer stops there
    assert conversation.answer(second, "yes")
    assert conversation.turns == [Turn("First?", "par"), Turn("Second?", "yes", "ctx")]
    conversation.clear()
    assert not conversation.answer(second, "yes, and")
    assert conversation.turns == []


class FailingEngine(Engine):
    def stream(self, prompt_ids, sampling, **options):
        raise RuntimeError("'NoneType' object has no attribute 'strip'")


def test_the_page_shows_a_plain_message_never_exception_text(scripted_run):
    models = ModelStore(find_checkpoints(scripted_run.folder), open=FailingEngine)
    app = build_app(models)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = launch(app, port=port, block=False)
    try:
        with pytest.raises(AppError) as raised:
            ask(Client(url, verbose=False), "hello")
        assert str(raised.value) == FAILED
    finally:
        app.close()
