"""The training loop. `Trainer.run` reads like a table of contents: build, then for each optimizer step fetch
its micro-batches, forward, backward, step, and let the log/eval/save helpers decide if they are due.

Everything a resumed run needs is in `Trainer.state_dict()`: the step, the optimizer, the learning-rate
schedule, the validation watch and every random state. Which examples a step uses is a pure function of
(seed, step), so the data position needs nothing more. A run stopped and resumed therefore computes exactly
the losses of the run left alone (bit for bit on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm import checkpoint as ckpt
from tinylm.config import Config, TrainConfig, format_config
from tinylm.data.instructions import epoch_order
from tinylm.data.packing import Batch, step_micro_batches
from tinylm.data.prepare import SAMPLE_TOKENS, prepare_data
from tinylm.distributed import World
from tinylm.evaluate import perplexity, validation_loss
from tinylm.generate import complete
from tinylm.model import TinyLM, activation_bytes_per_row, lm_loss, model_summary
from tinylm.plot import plot_runs
from tinylm.prompts import EncodedExample
from tinylm.runtime import autocast, fit_micro_batch, keep_freed_memory, seed_everything, training_dtype
from tinylm.tracking import METRICS_FILE, WANDB_ID_FILE, NoTrackers, build_trackers

log = logging.getLogger("tinylm")

# Evaluations without a new best validation loss, while training loss falls, before the run says it overfits.
OVERFIT_EVALS = 3
# Fields a resumed run cannot change: they decide the model, the data or the order of the examples.
LOCKED_ON_RESUME = ("model", "data", "train.seed", "train.batch_size", "train.gradient_accumulation_steps")
UNLOCKED_ON_RESUME = ("model.gradient_checkpointing", "data.gpt2_ranks_path")


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


def learning_rate(step: int, train: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_learning_rate at `total_steps`."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    span = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (
        train.learning_rate - train.min_learning_rate
    )


class LRSchedule:
    """`learning_rate` with the run's planned length, a pure function of the step.

    `total_steps` is fixed when the run starts and kept through resumes, so raising max_steps on resume
    never jumps the rate back up: past its planned end it holds min_learning_rate.
    """

    def __init__(self, train: TrainConfig, total_steps: int):
        self.train = train
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return learning_rate(step, self.train, self.total_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps = state["total_steps"]


@dataclass
class ValidationWatch:
    """Follows validation loss across evaluations: the best so far, whether the model has begun to overfit
    (validation stalls or rises while training loss keeps falling), and when to stop early."""

    patience: int = 0
    best_loss: float | None = None
    best_step: int = 0
    since_best: int = 0
    last_eval_step: int = -1
    train_at_best: float | None = None
    train_now: float | None = None
    train_sum: float = 0.0
    train_count: int = 0
    warned: bool = False

    def add_train_loss(self, loss: float) -> None:
        self.train_sum += loss
        self.train_count += 1

    def update(self, step: int, val_loss: float) -> bool:
        """Record one evaluation; True when it is a new best."""
        if self.train_count:
            self.train_now = self.train_sum / self.train_count
        self.train_sum, self.train_count, self.last_eval_step = 0.0, 0, step
        if self.best_loss is None or val_loss < self.best_loss:
            self.best_loss, self.best_step, self.since_best = val_loss, step, 0
            self.train_at_best, self.warned = self.train_now, False
            return True
        self.since_best += 1
        return False

    def overfitting(self) -> str | None:
        """One warning per stall, when validation has not improved for OVERFIT_EVALS evaluations while the
        training loss fell."""
        falling = self.train_now is not None and self.train_at_best is not None
        if (
            self.warned
            or self.since_best < OVERFIT_EVALS
            or not falling
            or self.train_now >= self.train_at_best
        ):
            return None
        self.warned = True
        return (
            f"validation loss has not improved for {self.since_best} evaluations (best {self.best_loss:.4f} "
            f"at step {self.best_step}) while training loss fell from {self.train_at_best:.4f} to "
            f"{self.train_now:.4f}: the model is overfitting. Try more data, more dropout (--set "
            "dropout=0.2), a lower learning_rate, or early stopping (--set early_stopping_patience=3); "
            "best_model.pt keeps the best weights"
        )

    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "patience"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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


def _tensors(value: Any, *, back: bool = False) -> Any:
    """NumPy arrays to tensors (and back), through nested containers: checkpoints hold no NumPy objects, so
    `torch.load(weights_only=True)` can read them."""
    if isinstance(value, dict):
        return {k: _tensors(v, back=back) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_tensors(v, back=back) for v in value)
    if back and isinstance(value, torch.Tensor):
        return value.numpy()
    if not back and isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value


def rng_state() -> dict[str, Any]:
    """Every random state a resumed run must continue from: Python's, NumPy's, torch's and the device's."""
    version, words, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": (version, torch.tensor(words, dtype=torch.int64), gauss),
        "numpy": _tensors(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words.tolist()), gauss))
    np.random.set_state(_tensors(state["numpy"], back=True))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


RUN_FILES = ("*.pt", METRICS_FILE, "config.json", "loss.png", WANDB_ID_FILE)
RUN_FOLDERS = ("wandb", "tensorboard")


def clear_run_folder(out_dir: Path) -> None:
    """Delete what a run writes (and nothing else a user may keep there)."""
    for pattern in RUN_FILES:
        for path in out_dir.glob(pattern):
            path.unlink()
    for name in RUN_FOLDERS:
        shutil.rmtree(out_dir / name, ignore_errors=True)


def _locked_change(saved: Config, asked: Config) -> str | None:
    """The first field that a resume may not change and `asked` changes, as 'name (was X, asked Y)'."""
    for dotted in LOCKED_ON_RESUME:
        section, _, name = dotted.partition(".")
        names = [name] if name else [f.name for f in fields(getattr(saved, section))]
        for field_name in names:
            if f"{section}.{field_name}" in UNLOCKED_ON_RESUME:
                continue
            was = getattr(getattr(saved, section), field_name)
            now = getattr(getattr(asked, section), field_name)
            if was != now:
                return f"{section}.{field_name} (the run has {was!r}, asked {now!r})"
    return None


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    best_val_loss: float | None
    interrupted: bool
    stop_reason: str | None = None


class Trainer:
    """Train `config` into the run folder `out_dir`; or continue the run of the checkpoint (or run folder)
    `resume` (True: the one in `out_dir`); or start a new run from the weights and tokenizer of `init_from`.

    `progress_bar`: True/False, or None for a bar exactly when stdout is a terminal.
    """

    def __init__(
        self,
        config: Config,
        *,
        out_dir: str | Path | None = None,
        resume: bool | str | Path | None = None,
        init_from: str | Path | None = None,
        overwrite: bool = False,
        progress_bar: bool | None = None,
    ):
        if resume is True:
            resume = out_dir
        self.resume_from = ckpt.resume_checkpoint_path(resume) if resume not in (None, False) else None
        if self.resume_from is not None:
            if out_dir is not None and Path(out_dir).resolve() != self.resume_from.parent.resolve():
                raise TrainingError(f"--out {out_dir} differs from the folder of --resume {resume}")
            if init_from is not None:
                raise TrainingError("--resume continues a run and --init-from starts a new one: choose one")
            out_dir = self.resume_from.parent
        if out_dir is None:
            raise TrainingError("no run folder: give out_dir (--out)")
        self.out_dir = Path(out_dir)
        # Under torchrun: this process's rank; the process group is joined in build().
        self.world = World.from_env()
        if self.resume_from is None:
            if overwrite:
                if self.world.is_main:
                    clear_run_folder(self.out_dir)
            elif (self.out_dir / ckpt.LATEST).exists() or (self.out_dir / METRICS_FILE).exists():
                raise TrainingError(
                    f"{self.out_dir} already holds a run: resume it with --resume {self.out_dir}, "
                    "start afresh with --overwrite, or choose another --out"
                )
        self.init_from = Path(init_from) if init_from is not None else None
        self.config = config.validate()
        self.progress_bar = progress_bar
        self.device = self.world.pick_device(config.train.device)
        self.step = 0
        self.stop_reason: str | None = None
        self._resume_state: dict[str, Any] | None = None
        self._saved_step: int | None = None
        # While a step is under way: the random states it started from (what a save must record).
        self._rng_at_step_start: dict[str, Any] | None = None
        self._updating = False
        self._order: tuple[int, list[int]] = (-1, [])
        # Training time and tokens since the last log line, for tokens/s.
        self._train_seconds, self._tokens = 0.0, 0

    # -- building ---------------------------------------------------------------------------------

    def build(self) -> None:
        self.world.start(self.device)
        seed_everything(self.config.train.seed)
        loaded = self._load_start_checkpoint()
        with self.world.local_main_first():  # one process per machine tokenizes; the others read its cache
            self.data = prepare_data(self.config, tokenizer=loaded.tokenizer if loaded else None)
        self.tokenizer = self.data.tokenizer
        c = self.config = replace(
            self.config, model=replace(self.config.model, vocab_size=self.tokenizer.vocab_size)
        ).validate()
        self.model = TinyLM(c.model)
        if loaded is not None:
            self.model.load_state_dict(loaded.model.state_dict())
        self.model.to(self.device)
        # What train_step calls: the model's loss, in DistributedDataParallel under torchrun. `self.model` stays
        # the bare model that is evaluated, sampled and saved (no 'module.' prefix in checkpoints).
        self.objective = self.world.wrap(self.model, lm_loss)
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
        micro_per_epoch = math.ceil(len(self.data.train) / c.train.batch_size)
        self.steps_per_epoch = math.ceil(micro_per_epoch / c.train.gradient_accumulation_steps)
        self.total_steps = c.train.epochs * self.steps_per_epoch
        if c.train.max_steps is not None:
            self.total_steps = min(self.total_steps, c.train.max_steps)
        self.schedule = LRSchedule(c.train, self.total_steps)
        self.watch = ValidationWatch(patience=c.train.early_stopping_patience)

    def _load_start_checkpoint(self) -> ckpt.LoadedModel | None:
        """Read the checkpoint to resume or to start from (once), and fit the config to it."""
        path = self.resume_from or self.init_from
        if path is None:
            return None
        path, payload = ckpt.read_checkpoint(path)
        loaded = ckpt.model_from_payload(path, payload)
        if self.resume_from is not None:
            state = payload.get("train_state")
            if not state:
                raise TrainingError(
                    f"{path}: holds no training state to resume from (resume from latest.pt, or start a new "
                    f"run from its weights with --init-from {path})"
                )
            changed = _locked_change(loaded.config, self.config)
            if changed:
                raise TrainingError(
                    f"cannot change {changed} when resuming {path}: resume unchanged, or start a new run "
                    f"from its weights with --init-from {path}"
                )
            self._resume_state = state
            self.step = payload["step"]
        else:
            # The architecture and tokenizer are the checkpoint's; dropout and checkpointing are this run's.
            model = replace(
                loaded.config.model,
                dropout=self.config.model.dropout,
                gradient_checkpointing=self.config.model.gradient_checkpointing,
            )
            data = replace(self.config.data, tokenizer=loaded.config.data.tokenizer)
            self.config = replace(self.config, model=model, data=data).validate()
            log.info("starting from the weights and tokenizer of %s (step %d)", path, payload.get("step", 0))
        return loaded

    # -- resumable state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "watch": self.watch.state_dict(),
            "data": self.data.key,
            "rng": self._rng_at_step_start or rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.watch.load_state_dict(state["watch"])
            self.step = state["step"]
            set_rng_state(state["rng"])
        except (KeyError, ValueError) as exc:
            raise TrainingError(
                f"{self.resume_from}: training state from another version of tinylm ({exc}); start a new run "
                f"from its weights with --init-from {self.resume_from}"
            ) from None
        if state.get("data") != self.data.key:
            log.warning(
                "warning: the data differ from those the run started on (%s changed?); it goes on with the "
                "new data, so it is not the run it would have been",
                self.config.data.source,
            )
        if self.schedule.total_steps != self.total_steps:
            log.info(
                "the run now ends at step %d instead of %d; the learning-rate schedule keeps its planned %d "
                "steps (and holds min_learning_rate after them)",
                self.total_steps,
                self.schedule.total_steps,
                self.schedule.total_steps,
            )

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            result = self._run()
            # torchrun ends the job when one process exits: all wait for rank 0's last save. Not after a
            # step cut short (a second Ctrl-C), as the others may still be inside it.
            if self._rng_at_step_start is None:
                self.world.barrier()
            return result
        finally:
            self.world.close()

    def _run(self) -> TrainResult:
        self.build()
        self._announce()
        if self._resume_state is not None and self.step >= self.total_steps:
            self.watch.load_state_dict(self._resume_state["watch"])
            log.info(
                "the run in %s is complete at step %d (raise max_steps or epochs to train on)",
                self.out_dir,
                self.step,
            )
            return TrainResult(self.out_dir, self.step, self.watch.best_loss, False)
        self._open_run_folder()
        self.trackers = (
            build_trackers(
                self.out_dir,
                config=self.config.to_dict(),
                start_step=self.step,
                total_steps=self.total_steps,
                wandb=self.config.train.wandb,
                tensorboard=self.config.train.tensorboard,
                bar=self.progress_bar,
            )
            if self.world.is_main
            else NoTrackers()
        )
        try:
            # Last, right before the first step: nothing after it may draw from the random generators.
            if self._resume_state is not None:
                self.load_state_dict(self._resume_state)
            else:
                self.save(ckpt.LATEST)  # from the start, the folder holds a checkpoint to resume from
            self.model.train()
            with self._stop_gracefully():
                while self.step < self.total_steps and not self._stopping():
                    loss = self.train_step()
                    self.maybe_log(loss)
                    self.maybe_evaluate()
                    self.maybe_save()
                finished = self.stop_reason in (None, "early stopping")
                if finished and self.watch.last_eval_step != self.step:
                    self.evaluate()
                self.save(ckpt.LATEST)
                if not finished:
                    self.plot()  # the steps since the last evaluation
        except KeyboardInterrupt:
            if self._updating:  # the weights are half updated: nothing consistent to save
                raise
            self.stop_reason = "interrupted"
            self.save(ckpt.LATEST)  # the state the unfinished step started from
            self.plot()
        except torch.OutOfMemoryError:
            raise TrainingError(self._out_of_memory()) from None
        except RuntimeError as exc:  # MPS and some CUDA paths raise a plain RuntimeError
            if isinstance(exc, TrainingError) or "out of memory" not in str(exc):
                raise
            raise TrainingError(self._out_of_memory()) from None
        finally:
            self.trackers.close()
        if self.stop_reason == "interrupted":
            log.info(
                "stopped: saved step %d to %s; resume with: tinylm train --resume %s",
                self.step,
                self.out_dir / ckpt.LATEST,
                self.out_dir,
            )
        return TrainResult(
            self.out_dir, self.step, self.watch.best_loss, self.stop_reason == "interrupted", self.stop_reason
        )

    def step_batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of one optimizer step: a pure function of (seed, step, rank, world
        size). Under torchrun the step's batch_size x accumulation examples are split evenly over the
        processes, and each packs its share into micro-batches of at most `micro_rows` rows."""
        t = self.config.train
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.data.train), seed=t.seed, epoch=epoch))
        first = within * t.gradient_accumulation_steps * t.batch_size
        chosen = self._order[1][first : first + t.gradient_accumulation_steps * t.batch_size]
        mine = [self.data.train.example(int(i)) for i in self.world.shard(chosen)]
        if not mine:
            # An epoch's last step may have fewer examples than there are processes. DDP needs a backward
            # pass from each, so a process left without examples runs one whose targets all count for nothing.
            spare = self.data.train.example(int(chosen[0]))
            mine = [EncodedExample(tokens=spare.tokens, loss_mask=[False] * len(spare.tokens))]
        return step_micro_batches(
            mine,
            pad_id=self.tokenizer.eos_id,
            packing=self.config.data.packing,
            row_capacity=self.config.model.max_seq_length,
            micro_rows=self.micro_rows,
        )

    def train_step(self) -> float:
        """One optimizer step over its accumulated micro-batches, which advances `step`; returns the mean
        per-token loss."""
        t = self.config.train
        started = time.perf_counter()
        self._rng_at_step_start = rng_state()
        batches = self.step_batches(self.step)
        (n_targets,) = self.world.sum(sum(batch.n_targets for batch in batches))
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.step)
        total = 0.0
        for index, batch in enumerate(batches):
            b = batch.to(self.device)
            with self.world.accumulating(self.objective, skip_sync=index < len(batches) - 1):
                with autocast(self.device, self.dtype):
                    loss_sum, _ = self.objective(
                        b.inputs,
                        b.targets,
                        positions=b.positions,
                        segments=b.segments,
                        chunk_size=t.loss_chunk_size,
                    )
                # Normalise by the whole step's target count (over all processes), so every target token
                # weighs the same; x world size because DDP averages the processes' gradients.
                (loss_sum * self.world.size / max(n_targets, 1)).backward()
            total += loss_sum.item()
            self._tokens += b.n_tokens
        (total,) = self.world.sum(total)
        loss = total / max(n_targets, 1)
        if not math.isfinite(loss):
            # Before the optimizer step, so the weights stay finite too.
            raise TrainingError(
                f"loss became {loss} at step {self.step + 1}; stopped. {self._last_checkpoint()} "
                "Try a lower learning_rate or a smaller grad_clip"
            )
        self._updating = True
        if t.grad_clip > 0:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            # Scale only when clipping: clip_grad_norm_ always multiplies every gradient (by 1.0 when under
            # the limit), a pass over 21M floats that was 2% of a v2 step on CPU.
            if norm > t.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), t.grad_clip, norm)
        self.optimizer.step()
        # The fused AdamW kernel changes the weights in place without bumping their version counters; bump
        # them, so what is keyed on a weight's version (generation's copy of the output layer) sees the step.
        torch.autograd.graph.increment_version(list(self.model.parameters()))
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._updating, self._rng_at_step_start = False, None
        self._train_seconds += time.perf_counter() - started
        return loss

    # -- helpers that know their own intervals ----------------------------------------------------

    def maybe_log(self, loss: float) -> None:
        self.trackers.advance(self.step)
        self.watch.add_train_loss(loss)
        if self.step % self.config.train.log_interval != 0 and self.step != self.total_steps:
            return
        self.trackers.log(
            {
                "epoch": self.step / self.steps_per_epoch,
                "loss": loss,
                "lr": self.schedule(self.step - 1),
                # Over the training steps since the last log line, not the evaluations or saves between.
                "tokens_per_sec": self._tokens / self._train_seconds if self._train_seconds > 0 else 0.0,
            },
            step=self.step,
        )
        self._train_seconds, self._tokens = 0.0, 0

    def maybe_evaluate(self) -> None:
        if self.step % self.config.train.eval_interval == 0:
            self.evaluate()

    def evaluate(self) -> None:
        t = self.config.train
        val_loss = validation_loss(
            self.model,
            self.data.val,
            batch_size=max(t.batch_size, 8),
            pad_id=self.tokenizer.eos_id,
            max_batches=t.eval_batches,
            world=self.world,
        )
        self.trackers.log(
            {"val_loss": val_loss, "val_perplexity": perplexity(val_loss), "samples": self.samples()},
            step=self.step,
        )
        self.plot()
        if self.watch.update(self.step, val_loss):
            self.save(ckpt.BEST)
        warning = self.watch.overfitting()
        if warning:
            log.warning("warning: %s", warning)
        if self.watch.should_stop():
            self.stop_reason = "early stopping"
            log.info(
                "early stopping: validation loss has not improved for %d evaluations (best %.4f at step %d, "
                "kept in %s)",
                self.watch.since_best,
                self.watch.best_loss,
                self.watch.best_step,
                self.out_dir / ckpt.BEST,
            )

    def plot(self) -> None:
        """Redraw loss.png from metrics.jsonl: at each evaluation and when the run stops (rank 0 only)."""
        if self.world.is_main:
            plot_runs([self.out_dir], self.out_dir / "loss.png")

    def samples(self) -> list[dict[str, str]]:
        """Greedy continuations of a fixed few held-out prompts, so users can watch the model learn (rank 0
        alone reports them)."""
        if not self.world.is_main:
            return []
        sampling = replace(self.config.sampling, temperature=0.0, max_new_tokens=SAMPLE_TOKENS)
        was_training = self.model.training
        self.model.eval()
        try:
            return [
                {
                    "prompt": prompt.text,
                    "completion": complete(
                        self.model, self.tokenizer, prompt.ids, sampling, stop=self.data.stop
                    ).text,
                }
                for prompt in self.data.samples
            ]
        finally:
            self.model.train(was_training)

    def maybe_save(self) -> None:
        if self.step % self.config.train.save_interval == 0:
            self.save(f"checkpoint_step_{self.step}.pt")
            self.save(ckpt.LATEST)

    def save(self, name: str) -> Path | None:
        """Write checkpoint `name` in the run folder (rank 0 only: every process holds the same state)."""
        if name == ckpt.LATEST:
            self._saved_step = self.step
        if not self.world.is_main:
            return None
        path = ckpt.save_checkpoint(
            self.out_dir / name,
            model=self.model,
            config=self.config,
            tokenizer=self.tokenizer,
            step=self.step,
            info={"best_val_loss": self.watch.best_loss, "total_steps": self.total_steps},
            train_state=None if name == ckpt.BEST else self.state_dict(),
        )
        return path

    # -- the run folder, stopping and failing -----------------------------------------------------

    def _open_run_folder(self) -> None:
        if not self.world.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temp_files(self.out_dir)
        tmp = self.out_dir / ".config.json.tmp"
        tmp.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.out_dir / "config.json")

    @contextmanager
    def _stop_gracefully(self) -> Iterator[None]:
        """Ctrl-C (or SIGTERM, as schedulers send) finishes the current step, saves and stops; a second
        Ctrl-C stops at once, saving the state the unfinished step started from."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: object) -> None:
            self.stop_reason = "interrupted"
            signal.signal(signal.SIGINT, signal.default_int_handler)
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.info("%s: stopping after step %d (Ctrl-C again stops at once)", name, self.step + 1)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stopping(self) -> bool:
        """Whether to stop before the next step. A signal reaches each process at its own moment, so under
        torchrun they agree first: one interrupted process stops them all after the same step."""
        if self.world.any(self.stop_reason == "interrupted"):
            self.stop_reason = self.stop_reason or "interrupted"
        return self.stop_reason is not None

    def _last_checkpoint(self) -> str:
        if self._saved_step is None:
            return "No checkpoint was saved."
        return f"The last checkpoint, {self.out_dir / ckpt.LATEST} (step {self._saved_step}), is kept."

    def _out_of_memory(self) -> str:
        m, t = self.config.model, self.config.train
        lower = [
            f"train.batch_size (now {t.batch_size}; raise gradient_accumulation_steps to keep the effective "
            "batch)",
            f"model.max_seq_length (now {m.max_seq_length})",
        ]
        if not m.gradient_checkpointing:
            lower.append("or turn model.gradient_checkpointing on")
        return (
            f"out of memory at step {self.step + 1} on {self.device}: lower {', '.join(lower)}. "
            f"{self._last_checkpoint()}"
        )

    def _announce(self) -> None:
        c = self.config
        effective = c.train.batch_size * c.train.gradient_accumulation_steps
        unit = "windows" if self.data.is_text else "samples"
        log.info("config:\n%s", format_config(c))
        log.info("%s", model_summary(self.model))
        log.info(
            "plan: %s training %s (%s held out) at effective batch %d is %d steps an epoch, %d for %d "
            "epochs%s; %s, %s, micro-batches of up to %d %s",
            f"{len(self.data.train):,}",
            unit,
            f"{len(self.data.val):,}",
            effective,
            self.steps_per_epoch,
            c.train.epochs * self.steps_per_epoch,
            c.train.epochs,
            f", capped at {self.total_steps} by max_steps"
            if self.total_steps < c.train.epochs * self.steps_per_epoch
            else "",
            f"{self.world.size} processes on {self.device.type}, each taking 1/{self.world.size} of every "
            "step's examples"
            if self.world.size > 1
            else f"device {self.device}",
            "bfloat16 autocast" if self.dtype == torch.bfloat16 else "float32",
            self.micro_rows,
            "packed rows" if c.data.packing else "examples",
        )
        if self.step:
            log.info("resuming from step %d of %d (%s)", self.step, self.total_steps, self.out_dir)
