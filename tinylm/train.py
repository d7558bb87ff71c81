"""The training loop. `Trainer.run` reads like a table of contents: build, then for each optimizer step
fetch its micro-batches, forward, backward, step, and let the log/eval/save helpers decide if they are due.

Which examples a step uses is a pure function of (seed, step), and the learning rate a pure function of the
step, so a checkpoint taken at any step boundary resumes exactly where the run stopped.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm import checkpoint as ckpt
from tinylm.config import Config, TrainConfig, format_config
from tinylm.data.instructions import encode_records, epoch_order, split_records, validation_size
from tinylm.data.packing import Batch, step_micro_batches
from tinylm.data.sources import Record, load_records
from tinylm.evaluate import perplexity, validation_loss
from tinylm.generate import complete
from tinylm.model import TinyLM, activation_bytes_per_row, lm_loss, model_summary
from tinylm.prompts import (
    CONTEXT_HEADER,
    DEFAULT_STOP_STRINGS,
    INSTRUCTION_HEADER,
    RESPONSE_HEADER,
    encode_prompt,
)
from tinylm.runtime import (
    autocast,
    fit_micro_batch,
    keep_freed_memory,
    pick_device,
    seed_everything,
    training_dtype,
)
from tinylm.tokenizer import Tokenizer, build_tokenizer
from tinylm.tracking import ConsoleTracker, JsonlTracker, Trackers

log = logging.getLogger("tinylm")

SAMPLE_PROMPTS = 3
SAMPLE_TOKENS = 40


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


def learning_rate(step: int, train: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_learning_rate at the last step."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    span = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (
        train.learning_rate - train.min_learning_rate
    )


def build_optimizer(model: TinyLM, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms, biases and embeddings are not decayed."""
    decay, no_decay = [], []
    embeddings = {id(model.embed.weight)}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel is one pass over each tensor: ~10x faster than the default loop on a CPU.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(0.9, 0.95), fused=fused or None)


def rng_state() -> dict[str, Any]:
    """Every random state a resumed run must continue from, as checkpoint-safe values."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
            for k, v in np.random.get_state(legacy=False).items()
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(
        {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state["numpy"].items()}
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def record_text(record: Record) -> str:
    """A record as the model will see it, so a trained BPE also learns the template's headers."""
    prompt = f"{INSTRUCTION_HEADER}{record.instruction}"
    if record.context.strip():
        prompt += f"{CONTEXT_HEADER}{record.context}"
    return f"{prompt}{RESPONSE_HEADER}{record.response}"


RUN_FILES = ("*.pt", "metrics.jsonl", "config.json", "loss.png")


def clear_run_folder(out_dir: Path) -> None:
    """Delete the files a run writes (and nothing else a user may keep there)."""
    for pattern in RUN_FILES:
        for path in out_dir.glob(pattern):
            path.unlink()


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    best_val_loss: float | None
    interrupted: bool


class Trainer:
    def __init__(self, config: Config, *, out_dir: str | Path, resume: bool = False, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.resume_from: Path | None = None
        if resume:
            self.resume_from = ckpt.resolve_checkpoint_path(self.out_dir / ckpt.LATEST)
        elif overwrite:
            clear_run_folder(self.out_dir)
        elif (self.out_dir / ckpt.LATEST).exists() or (self.out_dir / "metrics.jsonl").exists():
            raise TrainingError(
                f"{self.out_dir} already holds a run: resume it with --resume {self.out_dir}, "
                "start afresh with --overwrite, or choose another --out"
            )
        self.config = config.validate()
        self.device = pick_device(config.train.device)
        self.step = 0
        self.best_val_loss: float | None = None
        self._tokens = 0

    # -- building ---------------------------------------------------------------------------------

    def build(self) -> None:
        c = self.config
        seed_everything(c.train.seed)
        n_val = validation_size(c.data.dataset_size, c.data.val_fraction)
        records = load_records(c.data.source, synthetic_size=c.data.dataset_size + n_val, seed=c.train.seed)
        splits = split_records(
            records, dataset_size=c.data.dataset_size, val_fraction=c.data.val_fraction, seed=c.train.seed
        )
        self.tokenizer = self._build_tokenizer(splits.train)
        c = self.config = replace(c, model=replace(c.model, vocab_size=self.tokenizer.vocab_size)).validate()
        encode = dict(max_seq_length=c.model.max_seq_length, train_on_prompt=c.data.train_on_prompt)
        self.train_examples = encode_records(self.tokenizer, splits.train, **encode)
        self.val_examples = encode_records(self.tokenizer, splits.val, **encode)
        self.sample_records = splits.val[:SAMPLE_PROMPTS]
        self.model = TinyLM(c.model).to(self.device)
        self.optimizer = build_optimizer(self.model, c.train)
        self.dtype = training_dtype(self.device, c.train.precision)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.micro_rows = c.train.micro_batch_size or fit_micro_batch(
            c.train.batch_size * c.train.gradient_accumulation_steps,
            activation_bytes_per_row(c.model, checkpointing=c.model.gradient_checkpointing),
            self.device,
        )
        if c.train.compile:
            for block in self.model.blocks:
                block.compile(dynamic=True)
        micro_per_epoch = math.ceil(len(self.train_examples) / c.train.batch_size)
        self.steps_per_epoch = math.ceil(micro_per_epoch / c.train.gradient_accumulation_steps)
        self.total_steps = c.train.epochs * self.steps_per_epoch
        if c.train.max_steps is not None:
            self.total_steps = min(self.total_steps, c.train.max_steps)
        if self.resume_from is not None:
            self._load_train_state(self.resume_from)

    def _build_tokenizer(self, train: list[Record]) -> Tokenizer:
        if self.resume_from is not None:
            return ckpt.load_model(self.resume_from).tokenizer
        d = self.config.data
        return build_tokenizer(
            d.tokenizer,
            texts=(record_text(r) for r in train) if d.tokenizer == "bpe" else None,
            vocab_size=d.bpe_vocab_size if d.tokenizer == "bpe" else None,
            gpt2_ranks_path=d.gpt2_ranks_path,
        )

    def _load_train_state(self, path: Path) -> None:
        path, payload = ckpt.read_checkpoint(path)
        state = payload.get("train_state")
        if not state:
            raise TrainingError(
                f"{path}: holds no training state to resume from (use --init-from to start from its weights)"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = payload["step"]
        self.best_val_loss = state.get("best_val_loss")
        set_rng_state(state["rng"])

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.build()
        self._announce()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        self.trackers = Trackers([ConsoleTracker(), JsonlTracker(self.out_dir / "metrics.jsonl")])
        self.model.train()
        self._clock = time.perf_counter()
        self._clock_step = self.step
        self._tokens = 0
        interrupted = False
        try:
            while self.step < self.total_steps:
                loss = self.train_step()
                self.step += 1
                self.maybe_log(loss)
                self.maybe_evaluate()
                self.maybe_save()
            if self.step % self.config.train.eval_interval != 0:
                self.evaluate()
            self.save(ckpt.LATEST)
        except KeyboardInterrupt:
            interrupted = True
            self.save(ckpt.LATEST)
            log.info(
                "interrupted: saved step %d to %s; resume with --resume %s",
                self.step,
                self.out_dir / ckpt.LATEST,
                self.out_dir,
            )
        finally:
            self.trackers.close()
        return TrainResult(self.out_dir, self.step, self.best_val_loss, interrupted)

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of one optimizer step: a pure function of (seed, step)."""
        t = self.config.train
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_examples), seed=t.seed, epoch=epoch)
        first = within * t.gradient_accumulation_steps * t.batch_size
        chosen = order[first : first + t.gradient_accumulation_steps * t.batch_size]
        return step_micro_batches(
            [self.train_examples[i] for i in chosen],
            pad_id=self.tokenizer.eos_id,
            packing=self.config.data.packing,
            row_capacity=self.config.model.max_seq_length,
            micro_rows=self.micro_rows,
        )

    def train_step(self) -> float:
        """One optimizer step over its accumulated micro-batches; returns the mean per-token loss."""
        t = self.config.train
        batches = self.step_batches(self.step)
        n_targets = sum(batch.n_targets for batch in batches)
        lr = learning_rate(self.step, t, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for batch in batches:
            b = batch.to(self.device)
            with autocast(self.device, self.dtype):
                loss_sum, _ = lm_loss(
                    self.model,
                    b.inputs,
                    b.targets,
                    positions=b.positions,
                    segments=b.segments,
                    chunk_size=t.loss_chunk_size,
                )
            # Normalise by the whole step's target count, so every target token weighs the same.
            (loss_sum / max(n_targets, 1)).backward()
            total += loss_sum.item()
            self._tokens += b.n_tokens
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = total / max(n_targets, 1)
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss became {loss} at step {self.step + 1}; the last good checkpoint in {self.out_dir} is kept "
                "(try a lower learning_rate)"
            )
        return loss

    # -- helpers that know their own intervals ----------------------------------------------------

    def maybe_log(self, loss: float) -> None:
        t = self.config.train
        if self.step % t.log_interval != 0 and self.step != self.total_steps:
            return
        elapsed = time.perf_counter() - self._clock
        done = self.step - self._clock_step
        eta = elapsed / done * (self.total_steps - self.step) if done else 0.0
        self.trackers.log(
            {
                "epoch": self.step / self.steps_per_epoch,
                "loss": loss,
                "lr": learning_rate(self.step - 1, t, self.total_steps),
                "tokens_per_sec": self._tokens / elapsed if elapsed > 0 else 0.0,
                "eta": _duration(eta),
            },
            step=self.step,
        )

    def maybe_evaluate(self) -> None:
        if self.step % self.config.train.eval_interval == 0:
            self.evaluate()

    def evaluate(self) -> None:
        t = self.config.train
        val_loss = validation_loss(
            self.model,
            self.val_examples,
            batch_size=max(t.batch_size, 8),
            pad_id=self.tokenizer.eos_id,
            max_batches=t.eval_batches,
        )
        self.trackers.log(
            {"val_loss": val_loss, "val_perplexity": perplexity(val_loss), "samples": self.samples()},
            step=self.step,
        )
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.save(ckpt.BEST)

    def samples(self) -> list[dict[str, str]]:
        """Greedy answers to a fixed few held-out prompts, so users can watch the model learn."""
        sampling = replace(self.config.sampling, temperature=0.0, max_new_tokens=SAMPLE_TOKENS)
        budget = self.config.model.max_seq_length - SAMPLE_TOKENS
        was_training = self.model.training
        self.model.eval()
        try:
            return [
                {
                    "prompt": r.instruction,
                    "completion": complete(
                        self.model,
                        self.tokenizer,
                        encode_prompt(self.tokenizer, r.instruction, r.context, budget=budget),
                        sampling,
                        stop=DEFAULT_STOP_STRINGS,
                    ).text,
                }
                for r in self.sample_records
            ]
        finally:
            self.model.train(was_training)

    def maybe_save(self) -> None:
        if self.step % self.config.train.save_interval == 0:
            self.save(f"checkpoint_step_{self.step}.pt")
            self.save(ckpt.LATEST)

    def save(self, name: str) -> Path:
        train_state = None
        if name != ckpt.BEST:
            train_state = {
                "optimizer": self.optimizer.state_dict(),
                "best_val_loss": self.best_val_loss,
                "rng": rng_state(),
            }
        return ckpt.save_checkpoint(
            self.out_dir / name,
            model=self.model,
            config=self.config,
            tokenizer=self.tokenizer,
            step=self.step,
            info={"best_val_loss": self.best_val_loss, "total_steps": self.total_steps},
            train_state=train_state,
        )

    def _announce(self) -> None:
        c = self.config
        effective = c.train.batch_size * c.train.gradient_accumulation_steps
        log.info("config:\n%s", format_config(c))
        log.info("%s", model_summary(self.model))
        log.info(
            "plan: %s training samples (%s held out) at effective batch %d is %d steps an epoch, %d for %d "
            "epochs%s; device %s, %s, micro-batches of up to %d %s",
            f"{len(self.train_examples):,}",
            f"{len(self.val_examples):,}",
            effective,
            self.steps_per_epoch,
            c.train.epochs * self.steps_per_epoch,
            c.train.epochs,
            f", capped at {self.total_steps} by max_steps"
            if self.total_steps < c.train.epochs * self.steps_per_epoch
            else "",
            self.device,
            "bfloat16 autocast" if self.dtype == torch.bfloat16 else "float32",
            self.micro_rows,
            "packed rows" if c.data.packing else "examples",
        )
        if self.step:
            log.info("resuming from step %d of %d", self.step, self.total_steps)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
