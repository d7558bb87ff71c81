"""The run folder: who may write in it, what may start or resume there, and the checkpoints, config and plot
it holds.

One object owns the folder's rules, so the training loop only says what happened: one run at a time
writes there (an exclusive lock, taken before anything is written); a new run never overwrites an old one
unless asked; a resumed run may not change what decides the model, the data or the
order of the examples; `latest.pt`, `best_model.pt` and `checkpoint_step_N.pt` are written atomically, and
only by the main process of a run (every process holds the same state).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import fields
from pathlib import Path
from typing import TextIO

from tinylm import checkpoint as ckpt
from tinylm.config import Config
from tinylm.plot import plot_runs
from tinylm.state import TrainState
from tinylm.tokenizer import Tokenizer
from tinylm.tracking import METRICS_FILE, WANDB_ID_FILE

log = logging.getLogger("tinylm")

LOCK_FILE = ".lock"
# Fields a resumed run cannot change: they decide the model, the data, the order of the examples or the
# optimizer whose state the checkpoint holds.
LOCKED_ON_RESUME = (
    "model",
    "data",
    "train.seed",
    "train.batch_size",
    "train.gradient_accumulation_steps",
    "train.optimizer",
)
UNLOCKED_ON_RESUME = ("model.gradient_checkpointing", "data.gpt2_ranks_path")
# What a run writes (and so what --overwrite deletes); anything else a user keeps there stays.
RUN_FILES = ("*.pt", METRICS_FILE, "config.json", "loss.png", WANDB_ID_FILE)  # not the lock: it is held
RUN_FOLDERS = ("wandb", "tensorboard")


class RunFolderError(RuntimeError):
    """A run that may not start or resume in this folder; the message says what to do instead."""


def locked_change(saved: Config, asked: Config) -> str | None:
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


class RunFolder:
    """A run's folder. `writer` is False on every process but the main one: those only keep count."""

    def __init__(self, path: str | Path, *, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        # The step of the newest latest.pt, for messages about what a failure leaves behind.
        self.saved_step: int | None = None
        # What every checkpoint of the run carries beside the state: set by `open`.
        self._config: Config | None = None
        self._tokenizer: Tokenizer | None = None
        self._data_key = ""
        self._total_steps = 0
        self._lock: TextIO | None = None

    def lock(self) -> None:
        """Become the folder's only writer, before anything is written: a second run or resume into it fails
        at once naming the holder. The operating system releases the lock when its process ends, however it
        ends; a holder that died leaves only its name behind, and the next run takes over with a note.
        Readers (generate, chat, serve, eval, plot) never take it: every checkpoint is replaced atomically."""
        if not self.writer or self._lock is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = (self.path / LOCK_FILE).open("a+", encoding="utf-8")
        except OSError as exc:
            why = "it is a file, not a folder" if self.path.is_file() else exc.strerror
            raise RunFolderError(f"--out {self.path}: cannot write a run there ({why})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(
                f"{self.path} is in use by {holder}: wait for that run to end (or stop it), or choose another "
                "--out"
            ) from None
        handle.seek(0)
        left = handle.read().strip()
        if left:
            log.info("note: %s was left locked by %s, which has ended; taking it over", self.path, left)
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} on {socket.gethostname()} (since {started})\n")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        """Release the folder: an empty lock file says the last writer ended cleanly."""
        if self._lock is None:
            return
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.flush()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
        self._lock = None

    def prepare_new_run(self, *, overwrite: bool) -> None:
        """Refuse to start over an existing run, unless `overwrite`: then delete what a run writes."""
        if overwrite:
            if self.writer:
                for pattern in RUN_FILES:
                    for path in self.path.glob(pattern):
                        path.unlink()
                for name in RUN_FOLDERS:
                    shutil.rmtree(self.path / name, ignore_errors=True)
        elif (self.path / ckpt.LATEST).exists() or (self.path / METRICS_FILE).exists():
            raise RunFolderError(
                f"{self.path} already holds a run: resume it with --resume {self.path}, "
                "start afresh with --overwrite, or choose another --out"
            )

    @staticmethod
    def check_resume(checkpoint: Path, saved: Config, asked: Config) -> None:
        """Refuse a resume that changes a locked field, naming it and the way to do it instead."""
        changed = locked_change(saved, asked)
        if changed:
            raise RunFolderError(
                f"cannot change {changed} when resuming {checkpoint}: resume unchanged, or start a new run "
                f"from its weights with --init-from {checkpoint}"
            )

    def open(self, config: Config, *, tokenizer: Tokenizer, data_key: str, total_steps: int) -> None:
        """Create the folder, drop the temporary files of saves a kill interrupted, write config.json; the
        checkpoints saved from now on carry this config, tokenizer, data key and planned length."""
        self._config, self._tokenizer, self._data_key = config, tokenizer, data_key
        self._total_steps = total_steps
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temp_files(self.path)
        tmp = self.path / ".config.json.tmp"
        tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.path / "config.json")

    def save(self, name: str, state: TrainState) -> None:
        """Checkpoint `name`: weights only for best_model.pt, everything to resume from otherwise."""
        if name == ckpt.LATEST:
            self.saved_step = state.step
        if not self.writer:
            return
        assert self._config is not None and self._tokenizer is not None, "open() the folder first"
        ckpt.save_checkpoint(
            self.path / name,
            model=state.model,
            config=self._config,
            tokenizer=self._tokenizer,
            step=state.step,
            info={"best_val_loss": state.watch.best_loss, "total_steps": self._total_steps},
            train_state=None if name == ckpt.BEST else {**state.state_dict(), "data": self._data_key},
        )

    def maybe_save(self, state: TrainState, *, every: int) -> None:
        """Every `every` steps: a checkpoint named for the step, and latest.pt; otherwise nothing."""
        if state.step % every == 0:
            self.save(f"checkpoint_step_{state.step}.pt", state)
            self.save(ckpt.LATEST, state)

    def plot(self) -> None:
        """Redraw loss.png from metrics.jsonl."""
        if self.writer:
            plot_runs([self.path], self.path / "loss.png")

    def last_checkpoint(self) -> str:
        """What a failure leaves to resume from, as a sentence."""
        if self.saved_step is None:
            return "No checkpoint was saved."
        return f"The last checkpoint, {self.path / ckpt.LATEST} (step {self.saved_step}), is kept."
