"""The one checkpoint format: versioned, written atomically, loaded without unpickling code.

A checkpoint alone rebuilds its model: it carries the config, the tokenizer and the weights, so inference
never needs the training data or the network. Wherever a checkpoint is read, a Hugging Face model (a folder,
or hf:NAME) may stand in for it (`interchange.read_hf`).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from tinylm import interchange
from tinylm.config import Config, ConfigError, config_from_dict
from tinylm.model import TinyLM
from tinylm.tokenizer import Tokenizer, TokenizerError, tokenizer_from_dict

T = TypeVar("T")

FORMAT = "tinylm-checkpoint"
VERSION = 1
BEST = "best_model.pt"
LATEST = "latest.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not tinylm's; the message names the file."""


@dataclass
class LoadedModel:
    model: TinyLM
    config: Config
    tokenizer: Tokenizer
    path: Path
    info: dict[str, Any]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over it.

    A crash at any moment leaves either the old file or the new one, never a half-written one. A write that
    fails (a full disk, a folder that cannot be written) is a CheckpointError naming the file; the old file
    stays as it was.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = f"the write failed, is the disk full? ({str(exc).splitlines()[0]})"
        kept = " (the previous one is kept)" if path.exists() else ""
        raise CheckpointError(f"{path}: could not be written: {reason}{kept}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable: after a power loss the folder names the new file, not the old."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(folder: Path) -> None:
    """Delete the temporary files of saves that a kill interrupted (the checkpoints themselves are whole)."""
    for tmp in folder.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def save_checkpoint(
    path: str | Path,
    *,
    model: TinyLM,
    config: Config,
    tokenizer: Tokenizer,
    step: int,
    info: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Save weights, config and tokenizer (and, for resuming, the trainer's state) atomically."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "step": step,
        "info": info or {},
        "train_state": train_state,
    }
    atomic_torch_save(payload, path)
    return path


def _run_model(folder: Path) -> Path | None:
    """A run folder's best model, else its latest checkpoint, else None."""
    return next((folder / name for name in (BEST, LATEST) if (folder / name).is_file()), None)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its best model, else its latest checkpoint); a Hugging Face model
    is itself."""
    if interchange.is_hf_model(path):
        return Path(path)
    path = Path(path)
    if path.is_dir():
        found = _run_model(path)
        if found is None:
            raise CheckpointError(f"{path}: folder holds no {BEST} or {LATEST}")
        return found
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def resume_checkpoint_path(path: str | Path) -> Path:
    """The checkpoint a run resumes from: a run folder's latest.pt, or the given checkpoint file."""
    path = Path(path)
    if path.is_dir():
        if not (path / LATEST).is_file():
            raise CheckpointError(f"{path / LATEST} does not exist: {path} holds no run to resume")
        return path / LATEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def find_checkpoints(path: str | Path) -> list[Path]:
    """Every checkpoint `path` names, the one to open first at the front, for a front end to choose from.

    A file is itself; a folder gives its own *.pt files (best, latest, then by step) and the best (else
    latest) model of each run folder inside it.
    """
    if not Path(path).is_dir() or interchange.is_hf_model(path):
        return [resolve_checkpoint_path(path)]
    path = Path(path)

    def order(file: Path) -> tuple[int, int, str]:
        rank = {BEST: 0, LATEST: 1}.get(file.name, 2)
        step = re.fullmatch(r"checkpoint_step_(\d+)\.pt", file.name)
        return rank, int(step.group(1)) if step else -1, file.name

    found = sorted((f for f in path.glob("*.pt") if f.is_file()), key=order)
    found += [m for sub in sorted(path.iterdir()) if sub.is_dir() and (m := _run_model(sub))]
    if not found:
        raise CheckpointError(f"{path}: folder holds no checkpoints (*.pt files or run folders)")
    return found


def damage(path: Path) -> str | None:
    """What is damaged in a checkpoint file, or None when it is whole.

    A checkpoint is a zip container whose every record carries a CRC-32 of its bytes; torch.load does not
    check them, so a file changed after it was written (a bad disk, a copy cut short) would load silently.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        return f"not a readable checkpoint (truncated or corrupt?): {exc}"
    return None if bad is None else f"damaged: its record {bad} fails its checksum"


def read_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Verify, load and validate the raw checkpoint dictionary (tensors on CPU)."""
    path = resolve_checkpoint_path(path)
    problem = damage(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tinylm checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('version')} is not {VERSION}")
    return path, payload


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model, config and tokenizer from a checkpoint (or a Hugging Face model), in eval mode
    on `device`."""
    if interchange.is_hf_model(path):
        try:
            hf = interchange.read_hf(path)
        except interchange.InterchangeError as exc:
            raise CheckpointError(str(exc)) from None
        info = {"step": 0, "imported_from": str(path)}
        return LoadedModel(hf.model.to(device), hf.config, hf.tokenizer, hf.folder, info)
    path, payload = read_checkpoint(path)
    return model_from_payload(path, payload, device=device)


def model_from_payload(
    path: Path, payload: dict[str, Any], *, device: torch.device | str = "cpu"
) -> LoadedModel:
    """`load_model` for a checkpoint already read, so a resuming trainer reads the file once."""
    try:
        config = config_from_dict(payload["config"], origin=str(path))
        tokenizer = tokenizer_from_dict(payload["tokenizer"])
    except (ConfigError, TokenizerError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged config or tokenizer: {exc!r}") from None
    step = payload.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: damaged: its step is {step!r}, not a whole number")
    model = TinyLM(config.model)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the model in its config: {str(exc).splitlines()[0]}"
        ) from None
    model.to(device).eval()
    info = dict(payload.get("info") or {}, step=step)
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, path=path, info=info)


class ModelStore(Generic[T]):
    """The checkpoints a front end may switch between, loaded on first use; the last few used stay loaded.

    `open(model, tokenizer)` makes what the front end answers with (the web page: an inference engine) once
    per load, so it lives exactly as long as its model stays loaded.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        open: Callable[[TinyLM, Tokenizer], T],
        device: torch.device | str = "cpu",
        keep: int = 2,
    ):
        if not paths:
            raise CheckpointError("no checkpoints to serve")
        self.paths = [Path(p) for p in paths]
        self.open = open
        self.device = device
        self.keep = keep
        self._loaded: OrderedDict[Path, tuple[LoadedModel, T]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | Path) -> tuple[LoadedModel, T]:
        """The checkpoint as loaded, and what `open` made for it."""
        path = Path(path)
        if path not in self.paths:
            raise CheckpointError(f"{path} is not among the checkpoints being served")
        with self._lock:
            if path not in self._loaded:
                loaded = load_model(path, device=self.device)
                self._loaded[path] = (loaded, self.open(loaded.model, loaded.tokenizer))
                while len(self._loaded) > self.keep:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(path)
            return self._loaded[path]
