"""The web page: a Gradio chat over `Engine.stream`, on the model's own prompt template.

Each browser tab keeps its own conversation (a per-session `gr.State`) and its own choice of
checkpoint; answers stream through Gradio's queue, so one tab's long answer never freezes another. The
page reaches nothing outside this machine: analytics and Gradio's update check are off, the default
theme's fonts ship inside the gradio package, and a public link is made only when asked for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from tinylm.checkpoint import CheckpointError, LoadedModel, ModelStore
from tinylm.config import PRESETS, ConfigError, ModelConfig, SamplingConfig
from tinylm.conversation import Conversation, answer_status, fit_notice
from tinylm.generate import Engine
from tinylm.prompts import TEMPLATE, Turn

# Gradio reads this when a Blocks is made and at launch (telemetry and its version check).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
import gradio as gr

log = logging.getLogger("tinylm")

# Answers generated at once across all tabs; more wait in Gradio's queue, and the page stays live.
CONCURRENT_ANSWERS = 4
# Seconds between redraws of a streaming answer. A small model makes hundreds of tokens a second; sending
# each one would keep the server too busy to heed Stop or serve other tabs promptly.
REDRAW_EVERY = 0.05
# What the page says when answering fails unexpectedly; the exception itself goes to the log.
FAILED = "Something went wrong while answering. The server's log has the details; please try again."

# Prompts like the ones each kind of model learned from: (instruction, context passage).
SYNTHETIC_EXAMPLES = [
    ("What is 7 plus 5?", ""),
    ("Which is larger, 42 or 17?", ""),
    ("Sort these words alphabetically: wolf apple river", ""),
    ("How many words are in the passage?", "moon lake bird"),
    ("Reverse the order of the words in the passage.", "sun tree cat"),
]
_TOWER = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed and built by "
    "Gustave Eiffel's company from 1887 to 1889 as the entrance to the 1889 World's Fair."
)
DOLLY_EXAMPLES = [
    ("What is machine learning?", ""),
    ("Give me three tips for staying healthy.", ""),
    ("Write a short poem about the sea.", ""),
    ("Summarise the passage in one sentence.", _TOWER),
    ("When was the tower built?", _TOWER),
]


# One slider per sampling setting, in `respond`'s argument order: (field, label, note, lowest, highest,
# step). The sliders' bounds keep every value valid (Gradio refuses others); a checkpoint's own default
# beyond the usual highest value widens its slider.
SLIDERS = [
    ("temperature", "Temperature", "0 is greedy", 0, 2, 0.05),
    ("top_k", "Top-k", "0 is off", 0, 200, 1),
    ("top_p", "Top-p", None, 0.01, 1, 0.01),
    ("min_p", "Min-p", "0 is off", 0, 0.99, 0.01),
    ("repetition_penalty", "Repetition penalty", "above 1 discourages repeating", 0.5, 2, 0.05),
    ("max_new_tokens", "Max new tokens", None, 1, 1024, 1),
]


def _shape(model: ModelConfig) -> tuple:
    return model.d_model, model.n_heads, model.n_layers, model.d_ff, model.max_seq_length, model.tie_weights


def model_card(loaded: LoadedModel) -> str:
    """The model panel's table: what the model is and how far it was trained."""
    config, info = loaded.config, loaded.info
    m = config.model
    preset = next((name for name, p in PRESETS.items() if _shape(p.model) == _shape(m)), "custom")
    step = f"{info.get('step', 0):,}"
    if info.get("total_steps"):
        step += f" of {info['total_steps']:,}"
    best = info.get("best_val_loss")
    rows = [
        ("checkpoint", f"`{loaded.path}`"),
        ("preset", preset),
        (
            "architecture",
            f"{m.n_layers} layers, {m.d_model} wide, {m.n_heads} heads, feed-forward {m.d_ff}, "
            f"{m.max_seq_length}-token context, {'tied' if m.tie_weights else 'own'} output layer",
        ),
        ("parameters", f"{loaded.model.num_parameters():,}"),
        ("tokenizer", f"{config.data.tokenizer} ({loaded.tokenizer.vocab_size:,} tokens)"),
        ("trained on", f"`{config.data.source}`"),
        ("training steps", step),
        ("best validation loss", f"{best:.4f}" if best is not None else "not evaluated yet"),
    ]
    return "\n".join(f"- **{name}:** {value}" for name, value in rows)


def loss_curve(run_dir: Path) -> np.ndarray | None:
    """The run's loss.png, else training and validation loss drawn from its metrics.jsonl, else None."""
    png = run_dir / "loss.png"
    if png.is_file():
        try:
            with Image.open(png) as image:
                return np.asarray(image.convert("RGB"))
        except OSError as exc:
            log.warning("%s: unreadable image (%s); drawing metrics.jsonl instead", png, exc)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    # By step, so a resumed run's repeated steps count once (the later value wins).
    series: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}}
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written by a running training
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            for key, points in series.items():
                if isinstance(record.get(key), int | float):
                    points[record["step"]] = float(record[key])
    if not any(series.values()):
        return None
    figure = Figure(figsize=(6, 3.2), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, label, marker in (("loss", "training", None), ("val_loss", "validation", "o")):
        if series[key]:
            steps = sorted(series[key])
            axes.plot(steps, [series[key][s] for s in steps], label=label, marker=marker)
    axes.set_title("Loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _messages(turns: Sequence[Turn]) -> list[dict[str, str]]:
    """The conversation as the Chatbot shows it; a context passage is quoted under its question."""
    messages = []
    for turn in turns:
        question = turn.instruction
        if turn.context.strip():
            question += "\n\n" + "\n".join(f"> {line}" for line in turn.context.strip().splitlines())
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": turn.response}]
    return messages


def _with(notice: str, status: str) -> str:
    """The status line, after what fitting the prompt into the window left out, if anything."""
    return f"{status}; {notice}" if notice else status


def build_app(models: ModelStore[Engine], *, redraw_every: float = REDRAW_EVERY) -> gr.Blocks:
    """The page for the store's checkpoints, the first shown first (loading it fails here if it is broken).

    A streaming answer is redrawn at most every `redraw_every` seconds (0: on every piece of text).
    """
    first, _ = models.get(models.paths[0])
    defaults = first.config.sampling
    examples = SYNTHETIC_EXAMPLES if first.config.data.source == "synthetic" else DOLLY_EXAMPLES

    def respond(
        question: str,
        context: str,
        checkpoint: str,
        temperature: float,
        top_k: float,
        top_p: float,
        min_p: float,
        repetition_penalty: float,
        max_new_tokens: float,
        conversation: Conversation,
    ) -> Iterator[tuple]:
        if not isinstance(question, str) or not question.strip():
            yield gr.skip()
            return
        try:
            sampling = SamplingConfig(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_k=int(top_k),
                top_p=float(top_p),
                min_p=float(min_p),
                repetition_penalty=float(repetition_penalty),
            )
            loaded, engine = models.get(checkpoint)
            replace(loaded.config, sampling=sampling).validate()
        except (TypeError, ValueError, OverflowError):
            raise gr.Error("The sampling settings must be numbers within the sliders' ranges.") from None
        except (CheckpointError, ConfigError) as exc:  # our own one-line messages, written for users
            raise gr.Error(str(exc)) from None
        try:
            yield from answer(question, context or "", loaded, engine, sampling, conversation)
        except Exception:
            log.exception("answering on the web page failed")
            raise gr.Error(FAILED) from None

    def answer(
        question: str,
        context: str,
        loaded: LoadedModel,
        engine: Engine,
        sampling: SamplingConfig,
        conversation: Conversation,
    ) -> Iterator[tuple]:
        window = loaded.config.model.max_seq_length
        fitted = conversation.prompt(
            loaded.tokenizer, question, context, window=window, max_new_tokens=sampling.max_new_tokens
        )
        notice = fit_notice(fitted, window)
        prompt = fitted.ids
        epoch = conversation.ask(question, context)
        # The boxes empty at once; later updates leave them alone, so typing the next question is safe.
        yield "", "", conversation, _messages(conversation.turns), _with(notice, "generating...")
        answer = ""
        drawn = time.monotonic()
        for chunk in engine.stream(prompt, sampling, stop=TEMPLATE.stop_strings):
            answer += chunk.text
            done = chunk.finish_reason is not None
            # Recorded at every piece, so Stop leaves the answer so far in the history, as in the terminal.
            if not conversation.answer(epoch, answer.strip() if done else answer):
                yield gr.skip(), gr.skip(), conversation, _messages(conversation.turns), gr.skip()
                return
            if done or time.monotonic() - drawn >= redraw_every:
                drawn = time.monotonic()
                report = _with(notice, answer_status(chunk)) if done else gr.skip()
                yield gr.skip(), gr.skip(), conversation, _messages(conversation.turns), report

    def clear_conversation(conversation: Conversation) -> tuple[Conversation, list, str]:
        # No cancelling here: a streaming answer sees the cleared conversation, draws it and stops, so
        # none of its updates can arrive after this one and bring the old conversation back.
        conversation.clear()
        return conversation, [], ""

    def show_model(checkpoint: str) -> tuple[str, Any]:
        try:
            loaded, _ = models.get(checkpoint)
        except CheckpointError as exc:
            raise gr.Error(str(exc)) from None
        curve = loss_curve(loaded.path.parent)
        return model_card(loaded), gr.Image(value=curve, visible=curve is not None)

    with gr.Blocks(title="tinylm", analytics_enabled=False) as app:
        conversation = gr.State(Conversation())
        gr.Markdown("# tinylm\nChat with a language model trained from scratch.")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=420, buttons=["copy", "copy_all"])
                question = gr.Textbox(
                    label="Question",
                    show_label=False,
                    placeholder="Ask something and press Enter",
                    elem_id="question",
                )
                context = gr.Textbox(
                    label="Context passage (optional)",
                    placeholder="A passage the question is about, as in Dolly's context field",
                    lines=2,
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown(elem_id="status")
                gr.Examples([list(e) for e in examples], inputs=[question, context], label="Example prompts")
            with gr.Column(scale=2):
                with gr.Accordion("Sampling", open=True):
                    sliders = [
                        gr.Slider(
                            low,
                            max(high, getattr(defaults, name)),
                            value=getattr(defaults, name),
                            step=step,
                            label=label,
                            info=note,
                        )
                        for name, label, note, low, high, step in SLIDERS
                    ]
                with gr.Accordion("Model", open=True):
                    checkpoint = gr.Dropdown(
                        [(f"{p.parent.name}/{p.name}", str(p)) for p in models.paths],
                        value=str(models.paths[0]),
                        label="Checkpoint",
                        interactive=len(models.paths) > 1,
                    )
                    card = gr.Markdown(model_card(first))
                    first_curve = loss_curve(first.path.parent)
                    curve = gr.Image(
                        first_curve,
                        label="Loss curve",
                        show_label=False,
                        buttons=["download", "fullscreen"],
                        format="png",
                        interactive=False,
                        visible=first_curve is not None,
                    )

        answering = gr.on(
            [question.submit, send.click],
            respond,
            inputs=[question, context, checkpoint, *sliders, conversation],
            outputs=[question, context, conversation, chatbot, status],
            api_name="chat",
            concurrency_limit=CONCURRENT_ANSWERS,
        )
        stop.click(lambda: answer_status(None), outputs=status, cancels=[answering])
        gr.on(
            [clear.click, chatbot.clear],
            clear_conversation,
            inputs=conversation,
            outputs=[conversation, chatbot, status],
            api_name="clear",
        )
        checkpoint.change(show_model, checkpoint, [card, curve], api_name="model")
    return app


def launch(
    app: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    block: bool = True,
) -> str:
    """Serve the page on Gradio's queue and return its local address (at once, when block is False)."""
    app.queue(default_concurrency_limit=CONCURRENT_ANSWERS)
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        # Only gr.Error's plain messages reach the page; other exceptions' text stays in the log.
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
    )
    return url
