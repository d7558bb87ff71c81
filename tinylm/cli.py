"""The `tinylm` command. Subcommands import their modules lazily, so `tinylm --help` is instant.

User mistakes (bad config, data, checkpoint or prompt) end with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

CHECKPOINT_HELP = (
    "a checkpoint, a run folder, or a Hugging Face model (a folder with safetensors, or hf:NAME)"
)


def _bounded_int(text: str, lowest: int, highest: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not lowest <= value <= highest:
        raise argparse.ArgumentTypeError(f"{value} is not a {what} ({lowest} to {highest})")
    return value


def _port(text: str) -> int:
    return _bounded_int(text, 0, 65535, "port number")


def _seed(text: str) -> int:
    return _bounded_int(text, 0, 2**63 - 1, "seed")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults come from the checkpoint's config)")
    group.add_argument("--max-tokens", type=int, help="most new tokens to generate")
    group.add_argument("--temperature", type=float, help="0 means greedy (always the most likely token)")
    group.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: off)")
    group.add_argument("--top-p", type=float, help="sample among the smallest set covering this probability")
    group.add_argument(
        "--min-p", type=float, help="drop tokens below this share of the top token's probability"
    )
    group.add_argument(
        "--repetition-penalty", type=float, help="above 1 discourages repeating context tokens"
    )
    group.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)"
    )
    group.add_argument("--seed", type=_seed, help="make a sampled answer reproducible")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error:` line naming the command and the argument (usage: --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinylm", description="Train a small GPT-style language model, then talk to it.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (the v2 preset on Dolly by default)")
    train.add_argument("--preset", help="v1, v2 (default), v2-gpt2, v2-llama or demo")
    train.add_argument("--config", metavar="FILE", help="a YAML or TOML config file (see configs/)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set d_model=256 or --set train.max_steps=100 (repeatable)",
    )
    train.add_argument(
        "--data",
        metavar="SOURCE",
        help="instructions: a Hub data set name, a .jsonl/.json/.csv/.parquet file, or 'synthetic'; "
        "plain text: a .txt file, a folder of them, or hf:NAME (see --set hf_config/hf_split/text_field)",
    )
    train.add_argument("--out", metavar="DIR", help="run folder (default: checkpoints)")
    train.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], help="default: auto (CUDA, MPS, CPU)"
    )
    train.add_argument(
        "--resume", metavar="PATH", help="continue the run in this folder (or from this checkpoint)"
    )
    train.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start a new run from this model's weights and tokenizer: a checkpoint, or a Hugging Face GPT-2 "
        "or Llama model (a folder with safetensors, or hf:NAME)",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="start afresh in --out, deleting the run there"
    )
    train.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar")

    plot = sub.add_parser("plot", help="draw the loss curves of one or several runs on one chart")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (or its metrics.jsonl)")
    plot.add_argument(
        "--out", default="plot.png", metavar="FILE", help="the PNG to write (default: plot.png)"
    )

    evaluate = sub.add_parser(
        "eval",
        help="validation loss, perplexity, bits per byte and (for synthetic data) exact-match answers",
    )
    evaluate.add_argument("--checkpoint", required=True, metavar="PATH", help=CHECKPOINT_HELP)
    evaluate.add_argument("--data", metavar="SOURCE", help="default: the data the checkpoint was trained on")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    evaluate.add_argument(
        "--limit",
        type=int,
        default=200,
        help="most held-out records to answer, each turn of a conversation (default 200)",
    )
    evaluate.add_argument("--show", type=int, default=10, help="how many answers to print (default 10)")

    generate = sub.add_parser("generate", help="answer one prompt (or --chat)")
    generate.add_argument("--checkpoint", required=True, metavar="PATH", help=CHECKPOINT_HELP)
    generate.add_argument("--prompt", help="the instruction to answer")
    generate.add_argument("--context", default="", help="Dolly's optional context passage")
    generate.add_argument("--chat", action="store_true", help="open an interactive chat instead")
    generate.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming text"
    )
    generate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    _add_sampling_flags(generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    chat.add_argument("--checkpoint", required=True, metavar="PATH", help=CHECKPOINT_HELP)
    chat.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    _add_sampling_flags(chat)

    ui = sub.add_parser("ui", help="chat with a model on a web page (Gradio)")
    ui.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="a checkpoint, a run folder or a folder of runs"
    )
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    ui.add_argument("--port", type=_port, default=7860, help="default 7860")
    ui.add_argument("--share", action="store_true", help="also make a public link through Gradio's servers")
    ui.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP API for trained models")
    serve.add_argument(
        "--checkpoint", required=True, action="append", metavar="PATH", help="a model to serve (repeatable)"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 opens it to the network"
    )
    serve.add_argument("--port", type=_port, default=8000, help="default 8000")
    serve.add_argument("--api-key", metavar="KEY", help="require this key (default: $TINYLM_API_KEY if set)")
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="rows in the live batch: requests join it between tokens (default 16; 1: one at a time)",
    )
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])

    export = sub.add_parser(
        "export", help="write a model for transformers (--to hf) or llama.cpp (--to gguf)"
    )
    export.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint or run folder")
    export.add_argument(
        "--to",
        nargs=2,
        required=True,
        metavar=("FORMAT", "PATH"),
        help="hf DIR: a Hugging Face folder (safetensors, config, tokenizer, model card); gguf FILE: llama.cpp",
    )
    export.add_argument("--dtype", default="f32", help="GGUF weights: f32 (default), f16 or q8_0")
    export.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")
    return parser


def _train_config(args: argparse.Namespace):
    """The run's validated config, and the checkpoint it resumes (read once, here), if any."""
    from tinylm.config import apply_overrides, load_config_file, parse_set_args, preset
    from tinylm.train import StartCheckpoint

    overrides: dict[str, str] = {}
    start = None
    if args.resume:
        if args.preset or args.config:
            raise _UsageError("--resume takes the run's config from its checkpoint; change fields with --set")
        start = StartCheckpoint.read(args.resume, resume=True)
        config = start.loaded.config
    elif args.config:
        config = load_config_file(args.config, base=preset(args.preset or "v2"))
    else:
        config = preset(args.preset or "v2")
    if args.data:
        overrides["data.source"] = args.data
    if args.device:
        overrides["train.device"] = args.device
    overrides.update(parse_set_args(args.set))
    return apply_overrides(config, overrides).validate(), start


def cmd_train(args: argparse.Namespace) -> int:
    from tinylm.distributed import World, exit_process, record_errors

    # Under torchrun, an error is also written where its summary shows which rank failed first, and why.
    code = record_errors(_train)(args)
    if World.from_env().size > 1:
        exit_process(code)  # without the interpreter's teardown, which can abort a finished process
    return code


def _train(args: argparse.Namespace) -> int:
    from tinylm.distributed import World
    from tinylm.train import train

    config, start = _train_config(args)
    out_dir = args.out or (None if args.resume else "checkpoints")
    try:
        result = train(
            config,
            out_dir=out_dir,
            resume=start,
            init_from=args.init_from,
            overwrite=args.overwrite,
            progress_bar=False if args.quiet else None,
        )
    except KeyboardInterrupt:
        folder = start.path.parent if start else out_dir
        print(f"quit without saving; the last checkpoint in {folder} is kept", file=sys.stderr)
        return 130
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    if World.from_env().is_main:
        print(
            f"{'stopped' if result.interrupted else 'done'} at step {result.step}; best validation loss "
            f"{best}; checkpoints in {result.out_dir}"
        )
    return 130 if result.interrupted else 0


def _sampling(args: argparse.Namespace, base):
    from tinylm.config import apply_overrides

    flags = {
        "sampling.max_new_tokens": args.max_tokens,
        "sampling.temperature": args.temperature,
        "sampling.top_k": args.top_k,
        "sampling.top_p": args.top_p,
        "sampling.min_p": args.min_p,
        "sampling.repetition_penalty": args.repetition_penalty,
    }
    return (
        apply_overrides(base, {k: v for k, v in flags.items() if v is not None}, origin="flag")
        .validate()
        .sampling
    )


def _load(args: argparse.Namespace):
    from tinylm.checkpoint import load_model
    from tinylm.runtime import pick_device

    return load_model(args.checkpoint, device=pick_device(args.device))


def cmd_generate(args: argparse.Namespace) -> int:
    if args.chat:
        return cmd_chat(args)
    if args.prompt is None or not args.prompt.strip():
        raise _UsageError("--prompt is empty: give the instruction to answer, or use --chat")
    from tinylm.generate import Engine
    from tinylm.prompts import TEMPLATE, chat_prompt_budget

    loaded = _load(args)
    sampling = _sampling(args, loaded.config)
    window = loaded.config.model.max_seq_length
    fitted = TEMPLATE.encode_chat(
        loaded.tokenizer,
        [],
        args.prompt,
        args.context,
        max_prompt_tokens=chat_prompt_budget(window, sampling.max_new_tokens),
    )
    prompt, cut = fitted.ids, fitted.cut_tokens
    if cut:
        print(
            f"note: the prompt has {len(prompt) + cut} tokens; cut to {len(prompt)} to leave room for the "
            f"answer in the {window}-token context window (the end of the context passage goes first, "
            "then the end of the instruction, as in training)",
            file=sys.stderr,
        )
    chunks = Engine(loaded.model, loaded.tokenizer).stream(
        prompt,
        sampling,
        stop=(*TEMPLATE.stop_strings, *args.stop),
        seed=args.seed,
    )
    text = []
    try:
        for chunk in chunks:
            text.append(chunk.text)
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return 130
    if args.json:
        print(
            json.dumps(
                {
                    "text": "".join(text),
                    "finish_reason": chunk.finish_reason,
                    "prompt_tokens": chunk.prompt_tokens,
                    "completion_tokens": chunk.completion_tokens,
                    "tokens_per_sec": round(chunk.tokens_per_sec, 2),
                }
            )
        )
    else:
        sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tinylm.chat import ChatSession, run_chat

    loaded = _load(args)
    session = ChatSession(loaded, _sampling(args, loaded.config), stop=tuple(args.stop), seed=args.seed)
    return run_chat(session)


def cmd_ui(args: argparse.Namespace) -> int:
    from tinylm.checkpoint import ModelStore, find_checkpoints
    from tinylm.generate import Engine
    from tinylm.runtime import pick_device

    models = ModelStore(find_checkpoints(args.checkpoint), open=Engine, device=pick_device(args.device))
    models.get(models.paths[0])  # a missing or broken checkpoint fails here, before gradio's slow import
    from tinylm.webui import build_app, launch

    app = build_app(models)
    try:
        launch(app, host=args.host, port=args.port, share=args.share)
    except OSError:
        raise _UsageError(
            f"cannot serve on {args.host}:{args.port}: the port is taken or the address is not this "
            "machine's; choose another --port or --host"
        ) from None
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from tinylm.checkpoint import load_model
    from tinylm.runtime import pick_device
    from tinylm.server import ServeError, listen, serve

    if args.max_batch_size < 1:
        raise _UsageError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    try:
        listen(args.host, args.port).close()  # a taken port fails now, not after loading the models
        models = [load_model(path, device=pick_device(args.device)) for path in args.checkpoint]
        api_key = args.api_key or os.environ.get("TINYLM_API_KEY") or None
        serve(models, host=args.host, port=args.port, api_key=api_key, max_batch_size=args.max_batch_size)
    except ServeError as exc:
        raise _UsageError(str(exc)) from None
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tinylm.checkpoint import load_model
    from tinylm.data.prepare import prepare_data
    from tinylm.evaluate import held_out
    from tinylm.runtime import pick_device

    loaded = load_model(args.checkpoint, device=pick_device(args.device))
    c = loaded.config
    source = args.data or c.data.source
    data = prepare_data(replace(c, data=replace(c.data, source=source)), tokenizer=loaded.tokenizer)
    tokenizer = loaded.tokenizer
    measured = held_out(
        loaded.model, data.val, batch_size=16, pad_id=tokenizer.eos_id, byte_lengths=tokenizer.byte_lengths()
    )
    print(f"checkpoint {loaded.path} (step {loaded.info.get('step', 0)})")
    examples = f"{len(data.val):,} held-out {'windows' if data.is_text else 'records'} of {source}"
    print(
        f"validation on {examples}: loss {measured.loss:.4f}, perplexity {measured.perplexity:.2f}, "
        f"bits per byte {measured.bits_per_byte:.4f}"
    )
    if source == "synthetic":
        _synthetic_answers(args, loaded)
    return 0


def _synthetic_answers(args: argparse.Namespace, loaded) -> None:
    """Greedy answers to held-out synthetic tasks, every turn of a conversation after its earlier turns,
    each checked exactly; accuracy per task and turn, per turn, and over all."""
    from tinylm.data.instructions import split_records, validation_size
    from tinylm.data.sources import load_records
    from tinylm.data.synthetic import check_answer
    from tinylm.evaluate import answer_records
    from tinylm.generate import Engine

    c = loaded.config
    n_val = validation_size(c.data.dataset_size, c.data.val_fraction)
    records = load_records("synthetic", synthetic_size=c.data.dataset_size + n_val, seed=c.train.seed)
    val = split_records(
        records, dataset_size=c.data.dataset_size, val_fraction=c.data.val_fraction, seed=c.train.seed
    ).val
    answers = answer_records(
        Engine(loaded.model, loaded.tokenizer),
        [question for record in val[: args.limit] for question in record.questions()],
        is_correct=lambda r, a: check_answer({"response": r.response}, a),
    )
    for a in answers[: args.show]:
        mark = "ok " if a.correct else "BAD"
        context = f" [{a.record.context}]" if a.record.context else ""
        earlier = "".join(f"{t.instruction} -> {t.response!r}; " for t in a.record.history)
        print(
            f"  {mark} {earlier}{a.record.instruction}{context} -> {a.answer!r} (expected {a.record.response!r})"
        )

    def score(chosen: list) -> str:
        right = sum(a.correct for a in chosen)
        return f"{right}/{len(chosen)} = {right / len(chosen):.1%}"

    groups: dict[tuple[str, int], list] = {}
    for a in answers:
        groups.setdefault((a.record.category, len(a.record.history) + 1), []).append(a)
    print("exact match per task and turn:")
    for (task, turn), chosen in sorted(groups.items()):
        print(f"  {task:<20} turn {turn}  {score(chosen)}")
    for turn in sorted({turn for _, turn in groups}):
        print(f"turn {turn}: {score([a for a in answers if len(a.record.history) + 1 == turn])}")
    print(f"exact-match accuracy: {score(answers)} (greedy decoding, every turn)")


def cmd_export(args: argparse.Namespace) -> int:
    import shlex

    from tinylm.checkpoint import load_model
    from tinylm.interchange import model_card, write_gguf, write_hf

    kind, path = args.to
    if kind not in ("hf", "gguf"):
        raise _UsageError(f"--to {kind} is not a format: use --to hf DIR or --to gguf FILE")
    loaded = load_model(args.checkpoint)
    if kind == "hf":
        overwrite = ["--overwrite"] if args.overwrite else []
        command = shlex.join(
            ["tinylm", "export", "--checkpoint", args.checkpoint, "--to", kind, path, *overwrite]
        )
        card = model_card(loaded.config, loaded.tokenizer, info=loaded.info, command=command)
        written = write_hf(
            loaded.model, loaded.config, loaded.tokenizer, path, card=card, overwrite=args.overwrite
        )
    else:
        written = write_gguf(
            loaded.model,
            loaded.tokenizer,
            path,
            dtype=args.dtype,
            name=loaded.path.parent.name if loaded.path.suffix == ".pt" else loaded.path.name,
            overwrite=args.overwrite,
        )
    print(f"wrote {written}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from tinylm.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


class _UsageError(ValueError):
    pass


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "fix your input", shown as one line instead of a traceback."""
    from tinylm.checkpoint import CheckpointError
    from tinylm.config import ConfigError
    from tinylm.data.cache import CacheError
    from tinylm.data.sources import DataError
    from tinylm.interchange import InterchangeError
    from tinylm.plot import PlotError
    from tinylm.run_folder import RunFolderError
    from tinylm.runtime import DeviceError
    from tinylm.tokenizer import TokenizerError
    from tinylm.train import TrainingError

    return (
        CacheError,
        CheckpointError,
        ConfigError,
        DataError,
        DeviceError,
        InterchangeError,
        PlotError,
        RunFolderError,
        TokenizerError,
        TrainingError,
        _UsageError,
    )


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "plot": cmd_plot,
    "serve": cmd_serve,
    "ui": cmd_ui,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from tinylm.threads import choose_thread_waiting

    choose_thread_waiting()  # before torch loads
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
