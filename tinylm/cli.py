"""The `tinylm` command. Subcommands import their modules lazily, so `tinylm --help` is instant.

User mistakes (bad config, data, checkpoint or prompt) end with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence


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
    group.add_argument("--seed", type=int, help="make a sampled answer reproducible")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm", description="Train a small GPT-style language model, then talk to it."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (the v2 preset on Dolly by default)")
    train.add_argument("--preset", help="v1, v2 (default) or demo")
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
        help="a Hub data set name, a .jsonl/.json/.csv/.parquet file, or 'synthetic'",
    )
    train.add_argument(
        "--out", default="checkpoints", metavar="DIR", help="run folder (default: checkpoints)"
    )
    train.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], help="default: auto (CUDA, MPS, CPU)"
    )
    train.add_argument(
        "--resume", metavar="PATH", help="continue the run in this folder (or from this checkpoint)"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="start afresh in --out, deleting the run there"
    )

    evaluate = sub.add_parser(
        "eval", help="validation loss, perplexity and (for synthetic data) exact-match answers"
    )
    evaluate.add_argument("--checkpoint", required=True, metavar="PATH")
    evaluate.add_argument("--data", metavar="SOURCE", help="default: the data the checkpoint was trained on")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    evaluate.add_argument(
        "--limit", type=int, default=200, help="most held-out prompts to answer (default 200)"
    )
    evaluate.add_argument("--show", type=int, default=10, help="how many answers to print (default 10)")

    generate = sub.add_parser("generate", help="answer one prompt (or --chat)")
    generate.add_argument("--checkpoint", required=True, metavar="PATH")
    generate.add_argument("--prompt", help="the instruction to answer")
    generate.add_argument("--context", default="", help="Dolly's optional context passage")
    generate.add_argument("--chat", action="store_true", help="open an interactive chat instead")
    generate.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming text"
    )
    generate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    _add_sampling_flags(generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    chat.add_argument("--checkpoint", required=True, metavar="PATH")
    chat.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    _add_sampling_flags(chat)
    return parser


def _train_config(args: argparse.Namespace):
    from tinylm.checkpoint import read_checkpoint
    from tinylm.config import apply_overrides, config_from_dict, load_config_file, parse_set_args, preset

    overrides: dict[str, str] = {}
    if args.resume:
        _, payload = read_checkpoint(args.resume)
        config = config_from_dict(payload["config"], origin=str(args.resume))
    elif args.config:
        config = load_config_file(args.config, base=preset(args.preset or "v2"))
    else:
        config = preset(args.preset or "v2")
    if args.data:
        overrides["data.source"] = args.data
    if args.device:
        overrides["train.device"] = args.device
    overrides.update(parse_set_args(args.set))
    return apply_overrides(config, overrides).validate()


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tinylm.train import Trainer

    config = _train_config(args)
    out = args.out
    if args.resume:
        resume = Path(args.resume)
        out = resume if resume.is_dir() else resume.parent
    result = Trainer(config, out_dir=out, resume=bool(args.resume), overwrite=args.overwrite).run()
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    print(
        f"{'stopped' if result.interrupted else 'done'} at step {result.step}; best validation loss {best}; "
        f"checkpoints in {result.out_dir}"
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
    from tinylm.generate import stream
    from tinylm.prompts import DEFAULT_STOP_STRINGS, encode_prompt

    loaded = _load(args)
    sampling = _sampling(args, loaded.config)
    window = loaded.config.model.max_seq_length
    prompt = encode_prompt(loaded.tokenizer, args.prompt, args.context)
    if len(prompt) >= window:
        print(
            f"note: the prompt has {len(prompt)} tokens, more than the {window}-token context window; "
            f"the model sees its last {window * 3 // 4}",
            file=sys.stderr,
        )
    chunks = stream(
        loaded.model,
        loaded.tokenizer,
        prompt,
        sampling,
        stop=(*DEFAULT_STOP_STRINGS, *args.stop),
        seed=args.seed,
    )
    text = []
    for chunk in chunks:
        text.append(chunk.text)
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        last = chunk
    if args.json:
        print(
            json.dumps(
                {
                    "text": "".join(text),
                    "finish_reason": last.finish_reason,
                    "prompt_tokens": last.prompt_tokens,
                    "completion_tokens": last.completion_tokens,
                    "tokens_per_sec": round(last.tokens_per_sec, 2),
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


def cmd_eval(args: argparse.Namespace) -> int:
    from tinylm.checkpoint import load_model
    from tinylm.data.instructions import encode_records, split_records, validation_size
    from tinylm.data.sources import load_records
    from tinylm.data.synthetic import check_answer
    from tinylm.evaluate import answer_records, perplexity, validation_loss
    from tinylm.runtime import pick_device

    loaded = load_model(args.checkpoint, device=pick_device(args.device))
    c = loaded.config
    source = args.data or c.data.source
    n_val = validation_size(c.data.dataset_size, c.data.val_fraction)
    records = load_records(source, synthetic_size=c.data.dataset_size + n_val, seed=c.train.seed)
    val = split_records(
        records, dataset_size=c.data.dataset_size, val_fraction=c.data.val_fraction, seed=c.train.seed
    ).val
    examples = encode_records(
        loaded.tokenizer, val, max_seq_length=c.model.max_seq_length, train_on_prompt=c.data.train_on_prompt
    )
    loss = validation_loss(loaded.model, examples, batch_size=16, pad_id=loaded.tokenizer.eos_id)
    print(f"checkpoint {loaded.path} (step {loaded.info.get('step', 0)})")
    print(
        f"validation on {len(val):,} held-out records of {source}: loss {loss:.4f}, perplexity {perplexity(loss):.2f}"
    )
    if source == "synthetic":
        answers = answer_records(
            loaded.model,
            loaded.tokenizer,
            val[: args.limit],
            is_correct=lambda r, a: check_answer({"response": r.response}, a),
        )
        for a in answers[: args.show]:
            mark = "ok " if a.correct else "BAD"
            context = f" [{a.record.context}]" if a.record.context else ""
            print(
                f"  {mark} {a.record.instruction}{context} -> {a.answer!r} (expected {a.record.response!r})"
            )
        right = sum(a.correct for a in answers)
        print(f"exact-match accuracy: {right}/{len(answers)} = {right / len(answers):.1%} (greedy decoding)")
    return 0


class _UsageError(ValueError):
    pass


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "fix your input", shown as one line instead of a traceback."""
    from tinylm.checkpoint import CheckpointError
    from tinylm.config import ConfigError
    from tinylm.data.sources import DataError
    from tinylm.runtime import DeviceError
    from tinylm.tokenizer import TokenizerError
    from tinylm.train import TrainingError

    return (CheckpointError, ConfigError, DataError, DeviceError, TokenizerError, TrainingError, _UsageError)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "chat": cmd_chat}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    # Idle OpenMP threads sleep instead of spinning: where other work shares the cores, spinning threads
    # made training 2-5x slower (docs/benchmarks.md). It must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
