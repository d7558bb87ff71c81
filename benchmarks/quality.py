"""Quality per minute: validation loss against training time and tokens seen, tinylm's recipes beside
nanoGPT's own train.py, on tiny Shakespeare split as nanoGPT splits it (the first 90% of the characters
train, the last 10% validate).

Shapes (`--shape char|bpe|all`):
  char  nanoGPT's "I only have a macbook" CPU run from its README, character level: 4 layers, 4 heads, 128
        wide, block 64, batch 12, dropout 0, learning rate 1e-3 -> 1e-4, 100 warm-up steps, 2,000 steps.
        nanoGPT gets its char vocabulary (data/shakespeare_char/prepare.py); tinylm its byte tokenizer
        (tiny Shakespeare is ASCII, so bytes are characters).
  bpe   GPT-2 BPE at tinylm's v2 shape: 4 layers, 6 heads, 192 wide, d_ff 768, block 128; batch 8 and 300
        steps by default, so one run takes minutes on a 2-core CPU. nanoGPT's train.bin/val.bin hold the
        same GPT-2 ids (as data/shakespeare/prepare.py writes them).

    python benchmarks/quality.py --nanogpt ../peers/nanoGPT              # both shapes, 3 seeds (long)
    python benchmarks/quality.py --shape char --seeds 1 --nanogpt ../peers/nanoGPT
    python benchmarks/quality.py --recipe wd001=train.weight_decay=0.01  # one more tinylm recipe
    python benchmarks/quality.py --quick                                  # smoke test: 4 steps a run

Both systems take the same tokens per step (batch x block targets), the same number of steps, the same
learning-rate peak, floor, warm-up and cosine length, weight decay 0.1 and gradient clipping 1.0, float32,
no compilation, one fresh process per run with the same environment. A recipe may change any tinylm setting
on purpose (`--recipe NAME=key=value,...` takes the keys of `tinylm train --set`).

How it is measured:
- Training time excludes evaluation for both. tinylm's clock runs only around each step (batches and
  `train_step`). nanoGPT prints each step's own time; the step right after an evaluation is timed from the
  "step N:" line to its "iter N:" line, or, when a checkpoint was written in between, counted at the run's
  median step time. nanoGPT's final iteration after its last evaluation is not counted.
- Each evaluation uses the same amount of validation data: nanoGPT's estimate_loss draws `eval_iters`
  random batches; tinylm's `held_out` (what its Evaluator runs) reads as many windows, fixed and evenly
  spaced over the validation split. Both estimate the loss over the whole split.
- The final validation loss is the loss of each run's last weights over every window of the validation
  split, computed the same way for both (nanoGPT's from the checkpoint its last evaluation wrote).
- Bits per byte: loss / ln 2 x validation tokens / validation bytes.

Differences the benchmark cannot remove (stated again in its output):
- nanoGPT's seed is fixed (torch.manual_seed(1337 + DDP rank), nothing its configurator can set): its runs
  repeat one run, and their spread is timing only. tinylm's runs take seeds 1337, 1338, ...
- Optimizer: tinylm's AdamW betas are (0.9, 0.95); nanoGPT's char config sets beta2 0.99. nanoGPT decays
  its (tied) embeddings, tinylm does not decay embeddings. Warm-up: nanoGPT's lr x (it+1)/(warmup+1),
  tinylm's lr x (step+1)/warmup.
- Models: nanoGPT has no biases (bias=False), exact GELU, a tied output layer, and pads GPT-2's vocabulary
  to 50,304; its char vocabulary is 65 where tinylm's bytes are 257. tinylm's reference design has
  sinusoidal positions and an untied output layer with a bias; its gpt2 recipe ties it, as nanoGPT does.
- Data order: nanoGPT samples windows at random offsets; tinylm reads the fixed windows in shuffled epochs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

# Run this checkout's tinylm, not an installed copy.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tinylm.threads import choose_thread_waiting  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
GPT2_RANKS = SHARED / "gpt2.tiktoken"
VAL_FRACTION = 0.1
FIRST_SEED = 1337  # nanoGPT's own
WEIGHT_DECAY = 0.1  # nanoGPT's default, which neither shape's command changes
GRAD_CLIP = 1.0
EVALS_PER_RUN = 20  # about this many evaluations a run, by default
NANOGPT = "nanoGPT train.py"


@dataclass(frozen=True)
class Shape:
    name: str
    title: str
    tokenizer: str  # tinylm's
    dataset: str  # nanoGPT's data/<dataset>/
    n_layer: int
    n_head: int
    n_embd: int
    d_ff: int
    block: int
    batch: int
    steps: int
    warmup: int
    learning_rate: float
    min_lr: float
    beta2: float
    eval_iters: int
    eval_interval: int = 0  # 0: about steps / EVALS_PER_RUN
    # The nanoGPT config file its README's command starts from (read in its checkout).
    config_file: str | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.block


SHAPES = {
    "char": Shape(
        "char",
        "character level at nanoGPT's CPU shape",
        tokenizer="byte",
        dataset="shakespeare_char",
        n_layer=4,
        n_head=4,
        n_embd=128,
        d_ff=512,
        block=64,
        batch=12,
        steps=2000,
        warmup=100,
        learning_rate=1e-3,
        min_lr=1e-4,
        beta2=0.99,
        eval_iters=20,
        config_file="config/train_shakespeare_char.py",
    ),
    "bpe": Shape(
        "bpe",
        "GPT-2 BPE at tinylm's v2 shape",
        tokenizer="gpt2",
        dataset="shakespeare",
        n_layer=4,
        n_head=6,
        n_embd=192,
        d_ff=768,
        block=128,
        batch=8,
        steps=300,
        warmup=30,
        learning_rate=1e-3,
        min_lr=1e-4,
        beta2=0.95,
        eval_iters=10,
    ),
}

# tinylm's recipes: config overrides on top of the shape (the keys of `tinylm train --set`).
RECIPES: dict[str, dict[str, Any]] = {
    # tinylm's own design (v2): sinusoidal positions, untied output layer, AdamW with warm-up and cosine.
    "reference": {"model.arch": "tinylm"},
    # GPT-2's design, tied output layer as in the v2-gpt2 preset (and nanoGPT).
    "gpt2": {"model.arch": "gpt2", "model.tie_weights": True},
    # The v2-fast preset's recipe on the shape's own size and learning rate: Llama's design (SwiGLU at two
    # thirds of the width), the output layer tied.
    "fast": {
        "model.arch": "llama",
        "model.tie_weights": True,
        "model.norm_eps": 1e-6,
    },
}


def resolve_shape(shape: Shape, args: argparse.Namespace) -> Shape:
    """The shape with the command line's steps, batch and evaluation settings; the warm-up is at most a
    tenth of the steps (so a short run still decays)."""
    steps = args.steps or shape.steps
    # By default about EVALS_PER_RUN evaluations, at an interval that divides the steps.
    interval = args.eval_interval or max(
        i for i in range(1, max(1, steps // EVALS_PER_RUN) + 1) if steps % i == 0
    )
    if steps % interval:
        sys.exit(
            f"error: --steps {steps} is not a multiple of the evaluation interval {interval} (nanoGPT "
            "evaluates only at multiples of it): choose --eval-interval"
        )
    return replace(
        shape,
        steps=steps,
        batch=args.batch_size or shape.batch,
        warmup=min(shape.warmup, steps // 10),
        eval_iters=args.eval_iters or shape.eval_iters,
        eval_interval=interval,
    )


def tinylm_overrides(
    shape: Shape, recipe: dict[str, Any], *, text: Path, gpt2_ranks: Path, seed: int
) -> dict[str, Any]:
    """The shape as tinylm config fields, with the recipe's on top. A SwiGLU feed-forward (arch llama)
    gets two thirds of the shape's width unless the recipe sets one: its three matrices then hold as many
    weights, and cost as much, as GELU's two (Llama's rule)."""
    swiglu = recipe.get("model.arch") == "llama"
    return {
        "model.d_model": shape.n_embd,
        "model.n_heads": shape.n_head,
        "model.n_layers": shape.n_layer,
        "model.d_ff": 8 * round(2 * shape.d_ff / 3 / 8) if swiglu else shape.d_ff,
        "model.max_seq_length": shape.block,
        "model.dropout": 0.0,
        "data.source": str(text),
        "data.tokenizer": shape.tokenizer,
        "data.gpt2_ranks_path": str(gpt2_ranks),
        "data.val_fraction": VAL_FRACTION,
        "train.batch_size": shape.batch,
        "train.gradient_accumulation_steps": 1,
        "train.learning_rate": shape.learning_rate,
        "train.min_learning_rate": shape.min_lr,
        "train.warmup_steps": shape.warmup,
        "train.weight_decay": WEIGHT_DECAY,
        "train.grad_clip": GRAD_CLIP,
        "train.max_steps": shape.steps,
        "train.epochs": shape.steps,  # enough epochs that max_steps ends the run
        "train.seed": seed,
        "train.device": "cpu",
        "train.precision": "fp32",  # as nanoGPT trains on a CPU
        "train.compile": False,
        **recipe,
    }


def nanogpt_args(shape: Shape, *, out_dir: Path, config_dir: Path) -> list[str]:
    """train.py's arguments: the README's command for the char shape, the same settings for bpe, plus the
    evaluation interval and a checkpoint at every evaluation (for the final whole-split loss)."""
    values: dict[str, Any] = {
        "dataset": shape.dataset,
        "out_dir": str(out_dir),
        "device": "cpu",
        "compile": False,
        "eval_iters": shape.eval_iters,
        "eval_interval": shape.eval_interval,
        "log_interval": 1,
        "always_save_checkpoint": True,
        "wandb_log": False,
        "block_size": shape.block,
        "batch_size": shape.batch,
        "gradient_accumulation_steps": 1,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "n_embd": shape.n_embd,
        "dropout": 0.0,
        "max_iters": shape.steps,
        "lr_decay_iters": shape.steps,
        "learning_rate": shape.learning_rate,
        "min_lr": shape.min_lr,
        "warmup_iters": shape.warmup,
        "beta2": shape.beta2,
        "weight_decay": WEIGHT_DECAY,
        "grad_clip": GRAD_CLIP,
    }
    # Floats keep their point: nanoGPT's configurator insists on the type of its default.
    args = [f"--{k}={float(v)!r}" if isinstance(v, float) else f"--{k}={v}" for k, v in values.items()]
    return ([str(config_dir / shape.config_file)] if shape.config_file else []) + args


def parse_recipes(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """`NAME=key=value,key=value` -> {NAME: {key: value}}."""
    from tinylm.config import ConfigError, parse_set_args

    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, settings = item.partition("=")
        if not sep or not name.strip() or not settings.strip():
            sys.exit(f"error: --recipe wants NAME=key=value,key=value, got {item!r}")
        try:
            out[name.strip()] = parse_set_args(settings.split(","))
        except ConfigError as exc:
            sys.exit(f"error: --recipe {name.strip()}: {exc}")
    return out


# -- the text, split and tokenized as nanoGPT does ------------------------------------------------------


def split_text(text: str) -> tuple[str, str]:
    """nanoGPT's split (and tinylm's for text): the first 90% of the characters, the rest."""
    n = len(text)
    return text[: int(n * (1 - VAL_FRACTION))], text[int(n * (1 - VAL_FRACTION)) :]


def write_nanogpt_data(shape: Shape, text: str, folder: Path, *, gpt2_ranks: Path) -> int:
    """train.bin, val.bin (and for characters meta.pkl) as nanoGPT's prepare.py writes them; returns the
    number of validation tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    train, val = split_text(text)
    if shape.tokenizer == "byte":  # data/shakespeare_char/prepare.py
        chars = sorted(set(text))
        stoi = {ch: i for i, ch in enumerate(chars)}
        itos = dict(enumerate(chars))
        with open(folder / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
        ids = {"train": [stoi[c] for c in train], "val": [stoi[c] for c in val]}
    else:  # data/shakespeare/prepare.py; tinylm's gpt2 tokenizer is tiktoken's encode_ordinary
        from tinylm.tokenizer import build_tokenizer

        gpt2 = build_tokenizer("gpt2", gpt2_ranks_path=str(gpt2_ranks))
        ids = {"train": gpt2.encode(train), "val": gpt2.encode(val)}
    for split, values in ids.items():
        np.array(values, dtype=np.uint16).tofile(folder / f"{split}.bin")
    return len(ids["val"])


# -- nanoGPT's log -------------------------------------------------------------------------------------

# train.py prints f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
# f"iter {iter_num}: loss {lossf:.4f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%" and
# f"saving checkpoint to {out_dir}".
STEP_LINE = re.compile(r"step (\d+): train loss (\S+), val loss (\S+)$")
ITER_LINE = re.compile(r"iter (\d+): loss (\S+), time (\S+)ms, mfu (\S+)%$")
SAVE_LINE = "saving checkpoint to "


@dataclass(frozen=True)
class Curve:
    """One run's evaluations: step, training seconds before it, validation loss; and each step's loss."""

    steps: list[int]
    seconds: list[float]
    val_losses: list[float]
    train_losses: list[float]


def nanogpt_curve(lines: Sequence[tuple[float, str]]) -> Curve:
    """nanoGPT's curve from its stdout lines, each with the time it was read.

    An "iter N" line gives step N's own time, except after an evaluation, when that time includes the
    evaluation: then the step runs from the "step N:" line to the "iter N" line, unless a checkpoint was
    written in between, when the run's median step time stands in for it.
    """
    evals: list[tuple[int, float]] = []
    own: dict[int, float | None] = {}
    losses: dict[int, float] = {}
    after_eval: tuple[float, bool] | None = None  # (when the "step" line came, a checkpoint followed)
    for when, line in lines:
        line = line.strip()
        if m := STEP_LINE.match(line):
            evals.append((int(m[1]), float(m[3])))
            after_eval = (when, False)
        elif line.startswith(SAVE_LINE) and after_eval is not None:
            after_eval = (after_eval[0], True)
        elif m := ITER_LINE.match(line):
            step = int(m[1])
            losses[step] = float(m[2])
            if after_eval is None:
                own[step] = float(m[3]) / 1000
            else:
                own[step] = None if after_eval[1] else when - after_eval[0]
            after_eval = None
    known = [s for s in own.values() if s is not None]
    median = statistics.median(known) if known else 0.0
    seconds = {step: median if s is None else s for step, s in own.items()}
    return Curve(
        steps=[step for step, _ in evals],
        seconds=[sum((s for i, s in seconds.items() if i < step), 0.0) for step, _ in evals],
        val_losses=[loss for _, loss in evals],
        train_losses=[losses[i] for i in sorted(losses) if i < (evals[-1][0] if evals else 0)],
    )


# -- the runs, each in its own process ------------------------------------------------------------------


def whole_split_loss(
    loss_sum: Callable[[Any, Any], tuple[Any, int]], stream: np.ndarray, *, block: int, batch: int
) -> float:
    """Mean loss per token over every window of the stream (block + 1 tokens, consecutive windows sharing
    their boundary token, as tinylm cuts text), for either system's loss function."""
    import torch

    count = (len(stream) - 1) // block
    total, n = 0.0, 0
    with torch.no_grad():
        for first in range(0, count, batch):
            rows = np.stack(
                [stream[r * block : r * block + block + 1] for r in range(first, min(first + batch, count))]
            )
            windows = torch.from_numpy(rows.astype(np.int64))
            # Contiguous: nanoGPT's loss views its targets flat.
            summed, counted = loss_sum(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())
            total += float(summed)
            n += counted
    return total / max(n, 1)


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(f"{kind} {json.dumps(payload)}", flush=True)


def tinylm_worker(spec: dict[str, Any]) -> None:
    """One tinylm run: build it from the config, step it, evaluate every `eval_interval` steps with the
    clock stopped, then the whole validation split."""
    import torch

    from tinylm.config import apply_overrides, preset
    from tinylm.data.tokens import TokenArrays
    from tinylm.evaluate import held_out
    from tinylm.loss import lm_loss
    from tinylm.runtime import keep_freed_memory
    from tinylm.train import build_training

    config = apply_overrides(preset("v2"), spec["overrides"]).validate()
    keep_freed_memory()  # as `tinylm train` does on a CPU
    run = build_training(config, device=torch.device("cpu"))
    model, tokenizer, val = run.state.model, run.data.tokenizer, run.data.val
    chosen = np.unique(np.linspace(0, len(val) - 1, min(spec["eval_windows"], len(val))).round().astype(int))
    windows = TokenArrays(tokens=val.tokens, starts=val.starts[chosen], lengths=val.lengths[chosen])
    byte_lengths = tokenizer.byte_lengths()

    def evaluate() -> float:
        return held_out(
            model, windows, batch_size=spec["batch"], pad_id=tokenizer.eos_id, byte_lengths=byte_lengths
        ).loss

    curve = Curve([0], [0.0], [evaluate()], [])
    model.train()
    seconds = 0.0
    while run.state.step < spec["steps"]:
        started = time.perf_counter()
        curve.train_losses.append(run.step())
        seconds += time.perf_counter() - started
        step = run.state.step
        if step % spec["eval_interval"] == 0 or step == spec["steps"]:
            curve.steps.append(step)
            curve.seconds.append(seconds)
            curve.val_losses.append(evaluate())
        emit("PROGRESS", {"step": step})
    val_text = split_text(Path(spec["text"]).read_text(encoding="utf-8"))[1]
    stream = np.array(tokenizer.encode(val_text))
    model.eval()
    final = whole_split_loss(
        lambda x, y: lm_loss(model, x, y), stream, block=spec["block"], batch=spec["batch"]
    )
    emit("RESULT", {"curve": asdict(curve), "final_val_loss": final, "val_tokens": len(stream)})


def nanogpt_eval_worker(spec: dict[str, Any]) -> None:
    """The whole-split loss of the weights nanoGPT saved at its last evaluation, with its own model.py."""
    import importlib.util

    import torch

    sys.dont_write_bytecode = True  # leave nothing in the nanoGPT checkout
    module_spec = importlib.util.spec_from_file_location("nanogpt_model", spec["model_py"])
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    checkpoint = torch.load(spec["checkpoint"], map_location="cpu", weights_only=True)
    model = module.GPT(module.GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    stream = np.fromfile(spec["val_bin"], dtype=np.uint16)

    def loss_sum(x: Any, y: Any) -> tuple[Any, int]:
        _, loss = model(x, y)
        return loss * y.numel(), y.numel()

    final = whole_split_loss(loss_sum, stream, block=spec["block"], batch=spec["batch"])
    emit("RESULT", {"final_val_loss": final, "step": checkpoint["iter_num"]})


def child_env() -> dict[str, str]:
    # Every run, nanoGPT's too, gets how tinylm's threads wait (chosen once by `main`, as `tinylm train`
    # chooses), and no run writes bytecode (nanoGPT's model.py is imported from its checkout).
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}


class RunFailed(RuntimeError):
    pass


def stream_lines(cmd: list[str], *, cwd: Path, on_line: Callable[[float, str], None]) -> None:
    """Run `cmd`, handing each stdout line to `on_line` with the time it was read; stderr is kept and its
    last line named if the command fails."""
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=errors, text=True, env=child_env(), bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(time.perf_counter(), line)
        if proc.wait() != 0:
            errors.seek(0)
            tail = (errors.read().strip().splitlines() or ["(no output)"])[-1]
            raise RunFailed(f"exit status {proc.returncode}: {tail}")


def run_worker(spec: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def on_line(_: float, line: str) -> None:
        kind, _, payload = line.partition(" ")
        if kind == "RESULT":
            result.update(json.loads(payload))
        elif kind == "PROGRESS" and progress is not None:
            progress.step(json.loads(payload)["step"])

    stream_lines(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        cwd=REPO,
        on_line=on_line,
    )
    if not result:
        raise RunFailed("the worker printed no result")
    return result


def run_tinylm(
    shape: Shape, recipe: dict[str, Any], *, seed: int, args: argparse.Namespace, progress: Progress
) -> dict[str, Any]:
    overrides = tinylm_overrides(shape, recipe, text=args.text, gpt2_ranks=args.gpt2_ranks, seed=seed)
    spec = {
        "kind": "tinylm",
        "overrides": overrides,
        "steps": shape.steps,
        "eval_interval": shape.eval_interval,
        "eval_windows": shape.eval_iters * shape.batch,
        "batch": shape.batch,
        "block": shape.block,
        "text": str(args.text),
    }
    return {"seed": seed, **run_worker(spec, progress)}


def run_nanogpt(
    shape: Shape, *, work: Path, index: int, args: argparse.Namespace, progress: Progress
) -> dict[str, Any]:
    out_dir = work / f"out-{shape.name}-{index}"
    lines: list[tuple[float, str]] = []

    def on_line(when: float, line: str) -> None:
        lines.append((when, line))
        if m := ITER_LINE.match(line.strip()):
            progress.step(int(m[1]) + 1)

    cmd = [sys.executable, "-u", "train.py", *nanogpt_args(shape, out_dir=out_dir, config_dir=args.nanogpt)]
    stream_lines(cmd, cwd=work, on_line=on_line)
    curve = nanogpt_curve(lines)
    if not curve.steps or curve.steps[-1] != shape.steps:
        raise RunFailed(f"no evaluation at step {shape.steps} in nanoGPT's output")
    final = run_worker(
        {
            "kind": "nanogpt-eval",
            "model_py": str(args.nanogpt / "model.py"),
            "checkpoint": str(out_dir / "ckpt.pt"),
            "val_bin": str(work / "data" / shape.dataset / "val.bin"),
            "block": shape.block,
            "batch": shape.batch,
        }
    )
    if final["step"] != shape.steps:
        raise RunFailed(f"nanoGPT's checkpoint is from step {final['step']}, not {shape.steps}")
    return {"seed": FIRST_SEED, "curve": asdict(curve), "final_val_loss": final["final_val_loss"]}


def nanogpt_workdir(nanogpt: Path, work: Path) -> None:
    """A folder that runs nanoGPT's own train.py in place: links to its scripts, the benchmark's data."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("train.py", "model.py", "configurator.py"):
        (work / name).symlink_to(nanogpt / name)


class Progress:
    """Which run, its step and its ETA (from its steps so far), and the whole benchmark's, on stderr every
    few seconds."""

    def __init__(self, total_runs: int):
        self.total_runs, self.done = total_runs, 0
        self.walls: dict[str, list[float]] = {}
        self.remaining: dict[str, int] = {}
        self.shape, self.steps = "", 1
        self.started = self.shown = 0.0
        self.first: tuple[float, int] | None = None

    def plan(self, shape: str, runs: int) -> None:
        self.remaining[shape] = self.remaining.get(shape, 0) + runs

    def start(self, label: str, shape: str, steps: int) -> None:
        self.shape, self.steps, self.first = shape, steps, None
        self.started = self.shown = time.perf_counter()
        print(f"[{self.done + 1}/{self.total_runs}] {shape}: {label} (load {load()})", file=sys.stderr)

    def step(self, step: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, step)  # the rate starts here, after the process's start-up
        if step > self.steps or (now - self.shown < 5 and step < self.steps):
            return
        self.shown = now
        since, first_step = self.first
        line = f"    step {step}/{self.steps}, {now - self.started:.0f} s"
        if step > first_step:
            eta = (now - since) / (step - first_step) * (self.steps - step)
            line += f", ETA {eta:.0f} s{self.overall(eta)}"
        print(line, file=sys.stderr)

    def overall(self, run_eta: float) -> str:
        """The rest of the benchmark at the mean time of the finished runs of each shape, once known."""
        left = run_eta
        for shape, count in self.remaining.items():
            later = count - (shape == self.shape)
            if later and not self.walls.get(shape):
                return ""
            if later:
                left += later * statistics.fmean(self.walls[shape])
        return f" (all runs: {left / 60:.1f} min left)"

    def finish(self) -> None:
        self.done += 1
        self.remaining[self.shape] -= 1
        self.walls.setdefault(self.shape, []).append(time.perf_counter() - self.started)


# -- the report ----------------------------------------------------------------------------------------


def mean_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean training seconds and mean validation loss at the evaluations every run has."""
    steps = sorted(set.intersection(*(set(r["curve"]["steps"]) for r in runs)))
    seconds, losses = [], []
    for step in steps:
        at = [r["curve"]["steps"].index(step) for r in runs]
        seconds.append(statistics.fmean(r["curve"]["seconds"][i] for r, i in zip(runs, at, strict=True)))
        losses.append(statistics.fmean(r["curve"]["val_losses"][i] for r, i in zip(runs, at, strict=True)))
    return steps, seconds, losses


def time_to_reach(seconds: list[float], losses: list[float], target: float) -> float | None:
    """The first training time at which the (linearly interpolated) curve is at or below `target`."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return seconds[0]
            t0, t1, l0 = seconds[i - 1], seconds[i], losses[i - 1]
            return t0 + (t1 - t0) * (l0 - target) / (l0 - loss)
    return None


def loss_at(seconds: list[float], losses: list[float], when: float) -> float | None:
    """The curve's validation loss at training time `when`, interpolated; None past its end."""
    for i in range(1, len(seconds)):
        if seconds[i] >= when:
            t0, t1 = seconds[i - 1], seconds[i]
            share = (when - t0) / (t1 - t0) if t1 > t0 else 1.0
            return losses[i - 1] + share * (losses[i] - losses[i - 1])
    return None


def spread(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    return (
        f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
        if len(values) > 1
        else f"{mean:.{digits}f}"
    )


def shape_table(name: str, result: dict[str, Any]) -> list[str]:
    shape = Shape(**result["shape"])
    rows = {label: row for label, row in result["rows"].items() if row["runs"]}
    nano = rows.get(NANOGPT)
    target = end = None
    if nano:
        target = statistics.fmean(r["final_val_loss"] for r in nano["runs"])
        end = statistics.fmean(r["curve"]["seconds"][-1] for r in nano["runs"])
    lines = [
        f"### {name}: {shape.title}",
        "",
        f"{shape.n_layer} layers x {shape.n_embd} wide, {shape.n_head} heads, d_ff {shape.d_ff}, block "
        f"{shape.block}, batch {shape.batch} ({shape.tokens_per_step:,} tokens a step), {shape.steps} steps, "
        f"learning rate {shape.learning_rate:g} -> {shape.min_lr:g} after {shape.warmup} warm-up steps. "
        f"Evaluations every {shape.eval_interval} steps on {shape.eval_iters} x {shape.batch} windows; the final "
        "validation loss is over the whole validation split.",
        "",
        "| system / recipe | runs | final val loss | bits/byte | training s | tokens/s "
        "| s to nanoGPT's final loss | val loss at nanoGPT's end time |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in rows.items():
        runs = row["runs"]
        finals = [r["final_val_loss"] for r in runs]
        bpb = [f / math.log(2) * row["val_tokens"] / result["val_bytes"] for f in finals]
        train_s = [r["curve"]["seconds"][-1] for r in runs]
        rate = [
            shape.tokens_per_step * r["curve"]["steps"][-1] / s for r, s in zip(runs, train_s, strict=True)
        ]
        _, seconds, losses = mean_curve(runs)
        if target is None or end is None:
            reach = at_end = ""
        elif label == NANOGPT:
            reach, at_end = f"target {target:.4f}", f"end at {end:,.1f} s"
        else:
            t = time_to_reach(seconds, losses, target)
            reach = f"{t:,.1f} ({t / end:.2f}x)" if t is not None else f"not reached (best {min(losses):.4f})"
            v = loss_at(seconds, losses, end)
            at_end = f"{v:.4f}" if v is not None else f"ended at {seconds[-1]:,.1f} s"
        runs_text = f"{len(runs)}, seed fixed" if label == NANOGPT else str(len(runs))
        lines.append(
            f"| {label} | {runs_text} | {spread(finals, 4)} | {spread(bpb, 3)} | {spread(train_s, 1)} "
            f"| {statistics.fmean(rate):,.0f} | {reach} | {at_end} |"
        )
    for label, row in result["rows"].items():
        if row["failed"]:
            lines.append(f"- {label}: {len(row['failed'])} run(s) failed: {row['failed'][-1]}")
    for label, row in rows.items():
        if "command" in row:
            lines.append(f"- {label}: `{row['command']}`")
        if row.get("overrides"):
            settings = ", ".join(f"{k}={v}" for k, v in row["overrides"].items())
            lines.append(f"- {label}: {settings} on top of the shape")
    return lines


NOTES = [
    "Training s excludes evaluation (and nanoGPT's checkpoint writes) for both systems; tokens/s is tokens seen / training s. "
    "Final val loss: mean ± standard deviation over runs of each run's last weights over every window of the "
    "validation split; bits/byte is that loss / ln 2 x validation tokens / validation bytes. "
    "'s to nanoGPT's final loss' is when the mean curve (evaluations of a part of the validation split, "
    "interpolated) first reaches nanoGPT's mean final val loss, and that time over nanoGPT's training time; "
    "'val loss at nanoGPT's end time' is the mean curve at nanoGPT's mean training time.",
    "nanoGPT's seed is fixed (torch.manual_seed(1337 + DDP rank)): its runs repeat one run. tinylm's "
    "AdamW betas are (0.9, 0.95) where the char config's beta2 is 0.99; nanoGPT decays its tied embedding, "
    "has no biases, pads GPT-2's vocabulary to 50,304 and has 65 characters where tinylm has 257 byte ids; "
    "nanoGPT samples training windows at random offsets and evaluates random windows, tinylm reads fixed "
    "windows in shuffled epochs and evaluates fixed, evenly spaced ones.",
]


def report(raw: dict[str, Any]) -> str:
    lines = [
        "## Quality per minute: tinylm beside nanoGPT on tiny Shakespeare",
        "",
        f"Machine: {raw['machine']}. Load average before {raw['load_before']}, after {raw['load_after']}.",
        "",
    ]
    for name, result in raw["shapes"].items():
        lines += [*shape_table(name, result), ""]
    return "\n".join(lines + [note + "\n" for note in NOTES])


def plot(raw: dict[str, Any], out: Path) -> None:
    """Validation loss against training time (top) and tokens seen (bottom), one column per shape; each
    run a thin line, each system or recipe's mean a thick one."""
    from matplotlib.figure import Figure

    shapes = list(raw["shapes"])
    fig = Figure(figsize=(6.5 * len(shapes), 9))
    axes = fig.subplots(2, len(shapes), squeeze=False)
    for column, name in enumerate(shapes):
        result = raw["shapes"][name]
        per_step = Shape(**result["shape"]).tokens_per_step
        top, bottom = axes[0][column], axes[1][column]
        for index, (label, row) in enumerate(result["rows"].items()):
            if not row["runs"]:
                continue
            color = f"C{index % 10}"
            for r in row["runs"]:
                c = r["curve"]
                top.plot(c["seconds"], c["val_losses"], color=color, alpha=0.3, linewidth=0.8)
                bottom.plot(
                    [s * per_step / 1e6 for s in c["steps"]],
                    c["val_losses"],
                    color=color,
                    alpha=0.3,
                    linewidth=0.8,
                )
            steps, seconds, losses = mean_curve(row["runs"])
            top.plot(seconds, losses, color=color, linewidth=2, label=label)
            bottom.plot([s * per_step / 1e6 for s in steps], losses, color=color, linewidth=2, label=label)
        top.set(
            title=f"{name}: {result['shape']['title']}",
            xlabel="training seconds (evaluation excluded)",
            ylabel="validation loss",
        )
        bottom.set(xlabel="tokens seen (millions)", ylabel="validation loss")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} CPUs; torch {importlib.metadata.version('torch')}"


def run_shape(
    shape: Shape,
    text: str,
    *,
    labels: list[str],
    recipes: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    work: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Every run of one shape: `args.seeds` rounds over the rows, each round in a rotated order so that a
    change in the machine's load falls on all of them."""
    result: dict[str, Any] = {
        "shape": asdict(shape),
        "val_bytes": len(split_text(text)[1].encode("utf-8")),
        "rows": {label: {"runs": [], "failed": []} for label in labels},
    }
    if args.nanogpt:
        data = work / "data" / shape.dataset
        result["rows"][NANOGPT]["val_tokens"] = write_nanogpt_data(
            shape, text, data, gpt2_ranks=args.gpt2_ranks
        )
        command = nanogpt_args(shape, out_dir=Path("OUT"), config_dir=args.nanogpt)
        result["rows"][NANOGPT]["command"] = "python train.py " + " ".join(command)
    for label in labels:
        if label != NANOGPT:
            result["rows"][label]["overrides"] = recipes[label.removeprefix("tinylm ")]
    for index in range(args.seeds):
        for label in labels[index % len(labels) :] + labels[: index % len(labels)]:
            row = result["rows"][label]
            progress.start(f"{label}, run {index + 1}/{args.seeds}", shape.name, shape.steps)
            try:
                if label == NANOGPT:
                    run = run_nanogpt(shape, work=work, index=index, args=args, progress=progress)
                else:
                    recipe = row["overrides"]
                    run = run_tinylm(shape, recipe, seed=FIRST_SEED + index, args=args, progress=progress)
                    row["val_tokens"] = run.pop("val_tokens")
                run["curve"]["tokens"] = [step * shape.tokens_per_step for step in run["curve"]["steps"]]
                run["wall_seconds"] = time.perf_counter() - progress.started
                row["runs"].append(run)
                curve = run["curve"]
                print(
                    f"    final val loss {run['final_val_loss']:.4f} after {curve['seconds'][-1]:.0f} s of "
                    f"training; curve {list(zip(curve['seconds'], curve['val_losses'], strict=True))}",
                    file=sys.stderr,
                )
            except RunFailed as exc:
                print(f"    failed: {exc}", file=sys.stderr)
                row["failed"].append(str(exc))
            progress.finish()
    return result


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument(
        "--nanogpt", type=Path, help="a nanoGPT checkout, run in place (without it: tinylm alone)"
    )
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="the text (default: tiny Shakespeare)")
    parser.add_argument(
        "--gpt2-ranks", type=Path, default=GPT2_RANKS, help="gpt2.tiktoken, for the bpe shape"
    )
    parser.add_argument("--seeds", type=positive, default=3, help="runs per system and recipe (default 3)")
    parser.add_argument(
        "--steps", type=positive, help="steps per run (default: the shape's, 2000 char, 300 bpe)"
    )
    parser.add_argument(
        "--batch-size", type=positive, help="windows per step (default: the shape's, 12 char, 8 bpe)"
    )
    parser.add_argument(
        "--eval-interval",
        type=positive,
        help=f"steps between evaluations (default: about steps / {EVALS_PER_RUN}, dividing them)",
    )
    parser.add_argument(
        "--eval-iters", type=positive, help="batches per evaluation (default: the shape's, 20 char, 10 bpe)"
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="NAME=key=value,...",
        help="add a tinylm recipe: config overrides as `tinylm train --set` takes them (repeatable)",
    )
    parser.add_argument(
        "--recipes", help=f"comma-separated recipes to run (default: {', '.join(RECIPES)} and every --recipe)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 steps a run, evaluations every 2")
    parser.add_argument(
        "--out", type=Path, default=REPO / "runs" / "quality", help="folder for the table, JSON and PNG"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        (tinylm_worker if spec["kind"] == "tinylm" else nanogpt_eval_worker)(spec)
        return
    choose_thread_waiting()  # once, for every run (the runs are subprocesses that inherit it)
    if args.quick:
        args.steps, args.eval_interval, args.eval_iters = 4, 2, 2
    names = list(SHAPES) if args.shape == "all" else [args.shape]
    shapes = [resolve_shape(SHAPES[n], args) for n in names]
    if not args.text.is_file():
        sys.exit(f"error: --text {args.text}: no such file")
    if any(s.tokenizer == "gpt2" for s in shapes) and not args.gpt2_ranks.is_file():
        sys.exit(f"error: --gpt2-ranks {args.gpt2_ranks}: no such file (the bpe shape needs GPT-2's ranks)")
    if args.nanogpt:
        args.nanogpt = args.nanogpt.resolve()
        missing = [n for n in ("train.py", "model.py", "configurator.py") if not (args.nanogpt / n).is_file()]
        if missing:
            sys.exit(f"error: --nanogpt {args.nanogpt}: no {', '.join(missing)} there")
    args.text, args.gpt2_ranks = args.text.resolve(), args.gpt2_ranks.resolve()
    recipes = {**RECIPES, **parse_recipes(args.recipe)}
    chosen = [r.strip() for r in args.recipes.split(",")] if args.recipes else list(recipes)
    unknown = [r for r in chosen if r not in recipes]
    if unknown:
        sys.exit(f"error: --recipes: no recipe {', '.join(unknown)} (known: {', '.join(recipes)})")
    from tinylm.config import ConfigError, apply_overrides, preset

    for shape in shapes:  # a misspelt key or value fails now, not after an hour
        for name in chosen:
            overrides = tinylm_overrides(
                shape, recipes[name], text=args.text, gpt2_ranks=args.gpt2_ranks, seed=FIRST_SEED
            )
            try:
                apply_overrides(preset("v2"), overrides).validate()
            except ConfigError as exc:
                sys.exit(f"error: recipe {name}: {exc}")
    text = args.text.read_text(encoding="utf-8")
    labels = ([NANOGPT] if args.nanogpt else []) + [f"tinylm {name}" for name in chosen]
    progress = Progress(len(shapes) * len(labels) * args.seeds)
    for shape in shapes:
        progress.plan(shape.name, len(labels) * args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {"machine": machine(), "load_before": load(), "shapes": {}}
    print(f"machine: {raw['machine']}; load average {raw['load_before']}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tinylm-quality-") as tmp:
        work = Path(tmp)
        if args.nanogpt:
            nanogpt_workdir(args.nanogpt, work)
        for shape in shapes:
            raw["shapes"][shape.name] = run_shape(
                shape, text, labels=labels, recipes=recipes, args=args, work=work, progress=progress
            )
    raw["load_after"] = load()
    table = report(raw)
    (args.out / "quality.md").write_text(table, encoding="utf-8")
    (args.out / "quality.json").write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    plot(raw, args.out / "quality.png")
    print(table)
    print(f"wrote {args.out / 'quality.md'}, quality.json and quality.png", file=sys.stderr)


if __name__ == "__main__":
    main()
