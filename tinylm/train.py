"""The training loop, read top-down: resolve the run once, build its pieces, then for each optimizer step
fetch its micro-batches, forward, backward, step, and let the log/eval/save helpers decide if they are due.

The pieces live beside it: `state.TrainState` (everything a resume continues from), `run_folder.RunFolder`
(what may start or resume where, and the checkpoints), `evaluate.Evaluator` (validation loss and samples).
`train_step` is a plain function of the state and a step's batches, so tests and benchmarks drive it
directly. Which examples a step uses is a pure function of (seed, step): a run stopped and resumed
computes exactly the losses of the run left alone (bit for bit on CPU).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinylm import checkpoint as ckpt
from tinylm.config import Config, TrainConfig, format_config
from tinylm.data.instructions import epoch_order
from tinylm.data.mixture import DataPart, MixtureOrder
from tinylm.data.packing import Batch, step_micro_batches
from tinylm.data.prepare import PreparedData, prepare_data
from tinylm.data.tokens import TokenArrays
from tinylm.distributed import World
from tinylm.evaluate import Evaluator
from tinylm.generate import Engine
from tinylm.interchange import is_hf_model
from tinylm.loss import lm_loss
from tinylm.model import TinyLM, parameter_count
from tinylm.prompts import EncodedExample
from tinylm.run_folder import RunFolder
from tinylm.runtime import (
    activation_bytes_per_row,
    autocast,
    available_memory,
    fit_micro_batch,
    keep_freed_memory,
    seed_everything,
    training_dtype,
)
from tinylm.state import TrainState, rng_state
from tinylm.tracking import NoTrackers, Trackers, build_trackers

log = logging.getLogger("tinylm")


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """A step's loss was NaN or infinite; the step was not applied."""


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    best_val_loss: float | None
    interrupted: bool
    stop_reason: str | None = None


# -- the run, resolved once -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartCheckpoint:
    """The checkpoint a run resumes or starts from, read once: its model (config, tokenizer, weights), its
    step, and its training state (None in a weights-only checkpoint such as best_model.pt)."""

    loaded: ckpt.LoadedModel
    step: int
    train_state: dict[str, Any] | None

    @classmethod
    def read(cls, path: str | Path, *, resume: bool) -> StartCheckpoint:
        """`resume`: a run folder means its latest.pt; otherwise its best model, as for generation, or a
        Hugging Face model (a folder or hf:NAME) to start from."""
        if not resume and is_hf_model(path):
            return cls(ckpt.load_model(path), 0, None)
        asked = Path(path)
        path = ckpt.resume_checkpoint_path(asked) if resume else ckpt.resolve_checkpoint_path(asked)
        try:
            path, payload = ckpt.read_checkpoint(path)
        except ckpt.CheckpointError as exc:
            intact = _newest_intact_step_checkpoint(asked) if resume and asked.is_dir() else None
            if intact is None:
                raise
            raise ckpt.CheckpointError(
                f"{exc}. The newest intact checkpoint is {intact}: resume from it with --resume {intact}"
            ) from None
        loaded = ckpt.model_from_payload(path, payload)
        return cls(loaded, payload.get("step", 0), payload.get("train_state") or None)

    @property
    def path(self) -> Path:
        return self.loaded.path


def _newest_intact_step_checkpoint(folder: Path) -> Path | None:
    """The run folder's checkpoint_step_N.pt of the highest N whose file is whole, if any."""

    def step(path: Path) -> int:
        return int(path.stem.rpartition("_")[2])

    saved = [p for p in folder.glob("checkpoint_step_*.pt") if p.stem.rpartition("_")[2].isdigit()]
    return next((p for p in sorted(saved, key=step, reverse=True) if ckpt.damage(p) is None), None)


@dataclass(frozen=True)
class RunPlan:
    """What a run is, decided before anything is built: its config (fitted to the starting checkpoint),
    its folder, where it runs, and what it starts from."""

    config: Config
    folder: RunFolder
    world: World
    device: torch.device
    start: StartCheckpoint | None = None
    resuming: bool = False


def plan_run(
    config: Config,
    *,
    out_dir: str | Path | None = None,
    resume: StartCheckpoint | str | Path | bool | None = None,
    init_from: StartCheckpoint | str | Path | None = None,
    overwrite: bool = False,
) -> RunPlan:
    """Check the run folder's rules and read the starting checkpoint; `config` is already validated.

    resume continues the run of a checkpoint or run folder (True: the one in `out_dir`); init_from starts
    a new run from a trained model's weights and tokenizer.
    """
    if resume is True:
        resume = out_dir
    if resume not in (None, False) and init_from is not None:
        raise TrainingError("--resume continues a run and --init-from starts a new one: choose one")
    world = World.from_env()
    device = world.pick_device(config.train.device)
    if resume not in (None, False):
        assert not isinstance(resume, bool)
        start = resume if isinstance(resume, StartCheckpoint) else StartCheckpoint.read(resume, resume=True)
        if out_dir is not None and Path(out_dir).resolve() != start.path.parent.resolve():
            raise TrainingError(f"--out {out_dir} differs from the folder of --resume {resume}")
        if start.train_state is None:
            raise TrainingError(
                f"{start.path}: holds no training state to resume from (resume from latest.pt, or start a "
                f"new run from its weights with --init-from {start.path})"
            )
        RunFolder.check_resume(start.path, start.loaded.config, config)
        folder = RunFolder(start.path.parent, writer=world.is_main)
        folder.lock()
        return RunPlan(config, folder, world, device, start, resuming=True)
    if out_dir is None:
        raise TrainingError("no run folder: give out_dir (--out)")
    folder = RunFolder(out_dir, writer=world.is_main)
    folder.lock()
    try:
        folder.prepare_new_run(overwrite=overwrite)
        if init_from is None:
            return RunPlan(config, folder, world, device)
        start = (
            init_from
            if isinstance(init_from, StartCheckpoint)
            else StartCheckpoint.read(init_from, resume=False)
        )
        # The architecture and tokenizer are the checkpoint's; dropout and checkpointing are this run's.
        model = replace(
            start.loaded.config.model,
            dropout=config.model.dropout,
            gradient_checkpointing=config.model.gradient_checkpointing,
        )
        data = replace(config.data, tokenizer=start.loaded.config.data.tokenizer)
        config = replace(config, model=model, data=data).validate()
    except BaseException:
        folder.unlock()
        raise
    log.info("starting from the weights and tokenizer of %s (step %d)", start.path, start.step)
    return RunPlan(config, folder, world, device, start)


# -- the step -------------------------------------------------------------------------------------------


def steps_per_epoch(examples: int, train: TrainConfig) -> int:
    micro_per_epoch = math.ceil(examples / train.batch_size)
    return math.ceil(micro_per_epoch / train.gradient_accumulation_steps)


class StepBatches:
    """The micro-batches of each optimizer step: a pure function of (seed, step, rank, world size).

    One source is read in shuffled epochs, a step taking the next batch_size x accumulation examples (the
    last step of an epoch fewer); a mixture (`parts`, more than one) draws each step's examples by the
    sources' weights (`MixtureOrder`). Under torchrun the step's examples are split evenly over the
    processes, and each packs its share into micro-batches of at most `micro_rows` rows.
    """

    def __init__(
        self,
        examples: TokenArrays,
        config: Config,
        *,
        pad_id: int,
        micro_rows: int,
        world: World | None = None,
        parts: Sequence[DataPart] = (),
    ):
        self.examples = examples
        self.pad_id = pad_id
        self.config = config
        self.micro_rows = micro_rows
        self.world = world or World()
        self.per_epoch = steps_per_epoch(len(examples), config.train)
        self.per_step = config.train.gradient_accumulation_steps * config.train.batch_size
        self.mixture = (
            MixtureOrder(parts, seed=config.train.seed, per_step=self.per_step) if len(parts) > 1 else None
        )
        self._order: tuple[int, list[int]] = (-1, [])

    def chosen(self, step: int) -> list[int]:
        """The indices of the step's examples, over all processes."""
        if self.mixture is not None:
            return self.mixture(step)
        epoch, within = divmod(step, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.examples), seed=self.config.train.seed, epoch=epoch))
        return self._order[1][within * self.per_step : (within + 1) * self.per_step]

    def __call__(self, step: int) -> list[Batch]:
        chosen = self.chosen(step)
        mine = [self.examples.example(int(i)) for i in self.world.shard(chosen)]
        if not mine:
            # An epoch's last step may have fewer examples than there are processes. DDP needs a backward
            # pass from each, so a process left without examples runs one whose targets all count for nothing.
            spare = self.examples.example(int(chosen[0]))
            mine = [EncodedExample(tokens=spare.tokens, loss_mask=[False] * len(spare.tokens))]
        return step_micro_batches(
            mine,
            pad_id=self.pad_id,
            packing=self.config.data.packing,
            row_capacity=self.config.model.max_seq_length,
            micro_rows=self.micro_rows,
        )


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total norm of max_norm when they are over it; return the norm before.

    Unlike clip_grad_norm_, gradients under the limit are left untouched rather than multiplied by 1.0:
    a pass over every gradient saved on most steps.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def train_step(
    state: TrainState,
    batches: list[Batch],
    train: TrainConfig,
    *,
    dtype: torch.dtype | None = None,
    world: World | None = None,
    objective: nn.Module | None = None,
) -> float:
    """One optimizer step over a step's micro-batches; advances `state.step`, returns the mean per-token loss.

    dtype is the autocast dtype (None: float32); objective is the model's loss as `world.wrap` makes it
    under torchrun (default: `lm_loss` on state.model).
    """
    world = world or World()
    device = next(state.model.parameters()).device
    objective = objective or world.wrap(state.model, lm_loss)
    state.rng_at_step_start = rng_state()
    (n_targets,) = world.sum(sum(batch.n_targets for batch in batches))
    for group in state.optimizer.param_groups:
        group["lr"] = state.schedule(state.step)
    total = 0.0
    for index, batch in enumerate(batches):
        b = batch.to(device)
        with world.accumulating(objective, skip_sync=index < len(batches) - 1):
            with autocast(device, dtype):
                loss_sum, _ = objective(
                    b.inputs,
                    b.targets,
                    positions=b.positions,
                    segments=b.segments,
                    chunk_size=train.loss_chunk_size,
                )
            # Normalise by the whole step's target count (over all processes), so every target token
            # weighs the same; x world size because DDP averages the processes' gradients.
            (loss_sum * world.size / max(n_targets, 1)).backward()
        total += loss_sum.item()
    (total,) = world.sum(total)
    loss = total / max(n_targets, 1)
    if not math.isfinite(loss):
        # Before the optimizer step, so the weights stay finite too.
        raise NonFiniteLossError(f"loss became {loss} at step {state.step + 1}; stopped.")
    state.updating = True
    if train.grad_clip > 0:
        clip_gradients(list(state.model.parameters()), train.grad_clip)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.updating, state.rng_at_step_start = False, None
    return loss


# -- helpers that know their own intervals ----------------------------------------------------------------


class StepLog:
    """Training loss, learning rate and tokens/s every `log_interval` steps (and at the last step); tokens/s
    counts the training steps since the previous line, not the evaluations or saves between them."""

    def __init__(
        self,
        trackers: Trackers | NoTrackers,
        state: TrainState,
        *,
        every: int,
        total_steps: int,
        per_epoch: int,
    ):
        self.trackers, self.state = trackers, state
        self.every, self.total_steps, self.per_epoch = every, total_steps, per_epoch
        self.seconds, self.tokens = 0.0, 0

    def add(self, loss: float, *, tokens: int, seconds: float) -> None:
        step = self.state.step
        self.seconds += seconds
        self.tokens += tokens
        self.trackers.advance(step)
        self.state.watch.add_train_loss(loss)
        if step % self.every != 0 and step != self.total_steps:
            return
        self.trackers.log(
            {
                "epoch": step / self.per_epoch,
                "loss": loss,
                "lr": self.state.schedule(step - 1),
                "tokens_per_sec": self.tokens / self.seconds if self.seconds > 0 else 0.0,
            },
            step=step,
        )
        self.seconds, self.tokens = 0.0, 0


class StopRequest:
    """Ctrl-C (or SIGTERM, as schedulers send) asks the run to stop after the step under way; a second one of
    either raises KeyboardInterrupt at once. Under torchrun the processes agree before each step, so one
    interrupted process stops them all after the same step."""

    def __init__(self, state: TrainState, world: World):
        self.state, self.world = state, world
        self.reason: str | None = None

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def stop_now(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        def request_stop(signum: int, frame: object) -> None:
            self.reason = "interrupted"
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, stop_now)
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.info("%s: stopping after step %d (a second one stops at once)", name, self.state.step + 1)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def __bool__(self) -> bool:
        """Whether to stop before the next step."""
        if self.world.any(self.reason == "interrupted"):
            self.reason = self.reason or "interrupted"
        return self.reason is not None


# -- the loop ---------------------------------------------------------------------------------------------


def train(
    config: Config,
    *,
    out_dir: str | Path | None = None,
    resume: StartCheckpoint | str | Path | bool | None = None,
    init_from: StartCheckpoint | str | Path | None = None,
    overwrite: bool = False,
    progress_bar: bool | None = None,
) -> TrainResult:
    """Train `config` into the run folder `out_dir`, or continue a run (`resume`), or start a new run from a
    trained model (`init_from`); see `plan_run`. progress_bar None shows a bar when stdout is a terminal."""
    plan = plan_run(config, out_dir=out_dir, resume=resume, init_from=init_from, overwrite=overwrite)
    try:
        result, finished_step = _run(plan, progress_bar=progress_bar)
        # torchrun ends the job when one process exits: all wait for rank 0's last save. Not after a step
        # cut short (a second Ctrl-C), as the others may still be inside it.
        if finished_step:
            plan.world.barrier()
        return result
    finally:
        plan.folder.unlock()
        plan.world.close()


@dataclass
class Training:
    """A run's pieces, built from its resolved config: the data, the state, each step's batches and the
    autocast dtype. Tests and benchmarks build one and call `train_step` on it directly."""

    config: Config  # with the tokenizer's vocab_size
    data: PreparedData
    state: TrainState
    batches: StepBatches
    dtype: torch.dtype | None
    per_epoch: int
    total_steps: int

    def step(self, **options: Any) -> float:
        """`train_step` on this run's next step."""
        return train_step(
            self.state, self.batches(self.state.step), self.config.train, dtype=self.dtype, **options
        )


def build_training(
    config: Config,
    *,
    device: torch.device,
    world: World | None = None,
    start: StartCheckpoint | None = None,
    fused_optimizer: bool | None = None,
) -> Training:
    """Prepare the data (with `start`'s tokenizer, if given) and a fresh state (with its weights); seeds the
    random generators first, so the same config builds the same run."""
    world = world or World()
    seed_everything(config.train.seed)
    with world.local_main_first():  # one process per machine tokenizes; the others read its cache
        data = prepare_data(config, tokenizer=start.loaded.tokenizer if start else None)
    mask = data.train.mask
    if len(data.train) == 0 or (mask is not None and not mask.any()):
        raise TrainingError(
            f"no training example keeps a token to learn at model.max_seq_length = {config.model.max_seq_length}"
            ": the prompts fill the whole window; raise max_seq_length (--set max_seq_length=N)"
        )
    c = replace(config, model=replace(config.model, vocab_size=data.tokenizer.vocab_size))
    per_epoch = steps_per_epoch(len(data.train), c.train)
    total_steps = c.train.epochs * per_epoch
    if c.train.max_steps is not None:
        total_steps = min(total_steps, c.train.max_steps)
    micro_rows = c.train.micro_batch_size or fit_micro_batch(
        c.train.batch_size * c.train.gradient_accumulation_steps,
        activation_bytes_per_row(c.model, checkpointing=c.model.gradient_checkpointing),
        device,
    )
    check_memory(c, micro_rows=micro_rows, device=device)
    state = TrainState.create(
        c.model,
        c.train,
        total_steps=total_steps,
        device=device,
        weights=start.loaded.model.state_dict() if start else None,
        fused_optimizer=fused_optimizer,
    )
    if c.train.compile:
        for block in state.model.blocks:
            block.compile(dynamic=True)
    batches = StepBatches(
        data.train, c, pad_id=data.tokenizer.eos_id, micro_rows=micro_rows, world=world, parts=data.parts
    )
    dtype = training_dtype(device, c.train.precision)
    return Training(c, data, state, batches, dtype, per_epoch, total_steps)


def check_memory(config: Config, *, micro_rows: int, device: torch.device) -> None:
    """Refuse, before anything is built, a run whose estimated memory exceeds what `device` has available:
    float32 weights, gradients and AdamW's two moments, the activations of a micro-batch, and the output
    layer's logits (a chunk of rows at a time, or every counted position at once)."""
    m, t = config.model, config.train
    params = parameter_count(m)
    state = 4 * 4 * params
    activations = micro_rows * activation_bytes_per_row(m, checkpointing=m.gradient_checkpointing)
    logit_rows = t.loss_chunk_size or micro_rows * m.max_seq_length
    need = state + activations + 2 * 4 * logit_rows * m.vocab_size
    have = available_memory(device)
    if need <= have:
        return
    gib = 2**30
    raise TrainingError(
        f"this run needs about {need / gib:,.1f} GiB (weights, gradients and AdamW state of {params:,} "
        f"parameters: {state / gib:,.1f} GiB; activations at micro-batch {micro_rows}: "
        f"{activations / gib:,.1f} GiB) but {device.type} has {have / gib:,.1f} GiB available: lower "
        f"model.n_layers (now {m.n_layers}), model.d_model (now {m.d_model}), model.d_ff (now {m.d_ff}) or "
        f"train.micro_batch_size (now {micro_rows})"
    )


def _run(plan: RunPlan, *, progress_bar: bool | None) -> tuple[TrainResult, bool]:
    world, device, folder, start = plan.world, plan.device, plan.folder, plan.start
    world.start(device)
    run = build_training(plan.config, device=device, world=world, start=start)
    c, data, state, total_steps = run.config, run.data, run.state, run.total_steps
    # DistributedDataParallel under torchrun; state.model stays the bare model that is evaluated and saved.
    objective = world.wrap(state.model, lm_loss)
    if device.type == "cpu":
        keep_freed_memory()
    evaluate = Evaluator(data, Engine(state.model, data.tokenizer), c, world=world)
    _announce(run, plan)
    resume_state = start.train_state if plan.resuming and start else None
    if resume_state is not None and start is not None:
        state.step = start.step
        log.info("resuming from step %d of %d (%s)", state.step, total_steps, folder.path)
        if state.step >= total_steps:
            state.watch.load_state_dict(resume_state["watch"])
            log.info(
                "the run in %s is complete at step %d (raise max_steps or epochs to train on)",
                folder.path,
                state.step,
            )
            return TrainResult(folder.path, state.step, state.watch.best_loss, False), True
    folder.open(c, tokenizer=data.tokenizer, data_key=data.key, total_steps=total_steps)
    trackers = (
        build_trackers(
            folder.path,
            config=c.to_dict(),
            start_step=state.step,
            total_steps=total_steps,
            wandb=c.train.wandb,
            tensorboard=c.train.tensorboard,
            bar=progress_bar,
        )
        if world.is_main
        else NoTrackers()
    )
    stop = StopRequest(state, world)
    steps = StepLog(
        trackers, state, every=c.train.log_interval, total_steps=total_steps, per_epoch=run.per_epoch
    )
    try:
        # Last, right before the first step: nothing after it may draw from the random generators.
        if resume_state is not None:
            _load_state(state, resume_state, plan, data, total_steps)
        else:
            folder.save(ckpt.LATEST, state)  # from the start, the folder holds a checkpoint to resume from
        state.model.train()
        with stop.installed():
            while state.step < total_steps and not stop:
                step_batches = run.batches(state.step)
                started = time.perf_counter()
                loss = train_step(
                    state, step_batches, c.train, dtype=run.dtype, world=world, objective=objective
                )
                steps.add(
                    loss, tokens=sum(b.n_tokens for b in step_batches), seconds=time.perf_counter() - started
                )
                if state.step % c.train.eval_interval == 0:
                    stop.reason = _evaluate(evaluate, state, folder, trackers) or stop.reason
                folder.maybe_save(state, every=c.train.save_interval)
            finished = stop.reason in (None, "early stopping")
            if finished and state.watch.last_eval_step != state.step:
                _evaluate(evaluate, state, folder, trackers)
            folder.save(ckpt.LATEST, state)
            if not finished:
                folder.plot()  # the steps since the last evaluation
    except KeyboardInterrupt:
        if state.updating:  # the weights are half updated: nothing consistent to save
            raise
        stop.reason = "interrupted"
        folder.save(ckpt.LATEST, state)  # the state the unfinished step started from
        folder.plot()
    except NonFiniteLossError as exc:
        raise TrainingError(
            f"{exc} {folder.last_checkpoint()} Try a lower learning_rate or a smaller grad_clip"
        ) from None
    except (
        torch.OutOfMemoryError,
        RuntimeError,
    ) as exc:  # MPS and some CUDA paths raise a plain RuntimeError
        if isinstance(exc, TrainingError) or not (
            isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)
        ):
            raise
        raise TrainingError(_out_of_memory(c, state.step, device, folder)) from None
    finally:
        trackers.close()
    if stop.reason == "interrupted":
        log.info(
            "stopped: saved step %d to %s; resume with: tinylm train --resume %s",
            state.step,
            folder.path / ckpt.LATEST,
            folder.path,
        )
    result = TrainResult(
        folder.path, state.step, state.watch.best_loss, stop.reason == "interrupted", stop.reason
    )
    return result, state.rng_at_step_start is None


def _evaluate(
    evaluate: Evaluator, state: TrainState, folder: RunFolder, trackers: Trackers | NoTrackers
) -> str | None:
    """Log an evaluation, keep a new best model, warn of overfitting; "early stopping" when it is time."""
    measured = evaluate()
    trackers.log(measured, step=state.step)
    folder.plot()
    watch = state.watch
    if watch.update(state.step, measured["val_loss"]):
        folder.save(ckpt.BEST, state)
    warning = watch.overfitting()
    if warning:
        log.warning("warning: %s", warning)
    if not watch.should_stop():
        return None
    log.info(
        "early stopping: validation loss has not improved for %d evaluations (best %.4f at step %d, kept in %s)",
        watch.since_best,
        watch.best_loss,
        watch.best_step,
        folder.path / ckpt.BEST,
    )
    return "early stopping"


def _load_state(
    state: TrainState, saved: dict[str, Any], plan: RunPlan, data: PreparedData, total_steps: int
) -> None:
    """Continue from a checkpoint's training state, saying what differs from the run it was saved by."""
    try:
        state.load_state_dict(saved)
    except (KeyError, ValueError) as exc:
        path = plan.start.path if plan.start else plan.folder.path
        raise TrainingError(
            f"{path}: training state from another version of tinylm ({exc}); start a new run from its "
            f"weights with --init-from {path}"
        ) from None
    if saved.get("data") != data.key:
        log.warning(
            "warning: the data differ from those the run started on (%s changed?); it goes on with the new "
            "data, so it is not the run it would have been",
            plan.config.data.source,
        )
    if state.schedule.total_steps != total_steps:
        log.info(
            "the run now ends at step %d instead of %d; the learning-rate schedule keeps its planned %d steps "
            "(and holds min_learning_rate after them)",
            total_steps,
            state.schedule.total_steps,
            state.schedule.total_steps,
        )


def _out_of_memory(config: Config, step: int, device: torch.device, folder: RunFolder) -> str:
    m, t = config.model, config.train
    lower = [
        f"train.batch_size (now {t.batch_size}; raise gradient_accumulation_steps to keep the effective batch)",
        f"model.max_seq_length (now {m.max_seq_length})",
    ]
    if not m.gradient_checkpointing:
        lower.append("or turn model.gradient_checkpointing on")
    return (
        f"out of memory at step {step + 1} on {device}: lower {', '.join(lower)}. {folder.last_checkpoint()}"
    )


def model_summary(model: TinyLM) -> str:
    """A short table of the architecture and where the parameters are, printed when training starts."""
    c = model.config

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    head = "tied to the embedding" if c.tie_weights else f"{count(model.head):,}"
    norm = type(model.ln_f).__name__
    kv = f" ({c.kv_heads} key/value)" if c.kv_heads != c.n_heads else ""
    rows = [
        ("token embedding", f"Embedding({c.vocab_size}, {c.d_model})", f"{count(model.embed):,}"),
        (
            "positions",
            f"{model.design.positions}({c.max_seq_length}, {c.d_model}), dropout {c.dropout}",
            f"{count(model.positions):,}",
        ),
        (
            f"blocks x{c.n_layers}",
            f"{norm}, attention {c.n_heads} heads{kv} x {c.d_k}{', qk-norm' if c.qk_norm else ''}, "
            f"{norm}, {model.design.mlp} ff {c.d_model}->{c.d_ff}->{c.d_model}",
            f"{count(model.blocks[0]):,} each",
        ),
        ("final norm", f"{norm}({c.d_model})", f"{count(model.ln_f):,}"),
        ("output", f"Linear({c.d_model} -> {c.vocab_size})", head),
    ]
    width = max(len(r[1]) for r in rows)
    lines = [f"TinyLM ({c.arch}): {model.num_parameters():,} parameters"]
    lines += [f"  {name:<16} {what:<{width}}  {params:>14}" for name, what, params in rows]
    return "\n".join(lines)


def _announce(run: Training, plan: RunPlan) -> None:
    """The run's config, the model's summary and the plan: what one step is, how many, where."""
    c, world = run.config, plan.world
    planned = c.train.epochs * run.per_epoch
    log.info("config:\n%s", format_config(c))
    log.info("%s", model_summary(run.state.model))
    log.info(
        "plan: %s training %s (%s held out) at effective batch %d is %d steps an epoch, %d for %d epochs%s; "
        "%s, %s, micro-batches of up to %d %s",
        f"{len(run.data.train):,}",
        "windows" if run.data.is_text else "samples",
        f"{len(run.data.val):,}",
        c.train.batch_size * c.train.gradient_accumulation_steps,
        run.per_epoch,
        planned,
        c.train.epochs,
        f", capped at {run.total_steps} by max_steps" if run.total_steps < planned else "",
        f"{world.size} processes on {plan.device.type}, each taking 1/{world.size} of every step's examples"
        if world.size > 1
        else f"device {plan.device}",
        "bfloat16 autocast" if run.dtype == torch.bfloat16 else "float32",
        run.batches.micro_rows,
        "packed rows" if c.data.packing else "examples",
    )
