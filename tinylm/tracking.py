"""Where metrics go: the console (a progress bar, or plain lines) and a local JSONL file always; wandb and
TensorBoard when configured, behind the same two-method interface and imported only then.

No tracker may stop or stall training: an optional one that cannot start says so in one line and is left out.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

log = logging.getLogger("tinylm")

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb.json"
WANDB_DEFAULT_URL = "https://api.wandb.ai"
# Seconds to wait for the wandb server, instead of wandb's own (minutes long) default.
WANDB_INIT_TIMEOUT = 20
WANDB_PROBE_TIMEOUT = 3

WandbMode = Literal["online", "offline", "disabled", "shared"]
# WANDB_MODE's values and the `mode` each means to `wandb.init` (wandb still reads the old dryrun and run).
WANDB_MODES: dict[str, WandbMode] = {
    "online": "online",
    "offline": "offline",
    "disabled": "disabled",
    "shared": "shared",
    "dryrun": "offline",
    "run": "online",
}


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], *, step: int) -> None: ...

    def close(self) -> None: ...


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 100:
            return f"{value:,.0f}"
        if math.isfinite(value) and value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4f}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ConsoleTracker:
    """A progress bar (step/total, epoch, loss, learning rate, tokens/s, ETA) on a terminal; plain log lines,
    with the ETA, when the output is a file or a pipe, or when `bar` is False (--quiet).

    Evaluations and samples are always written as lines (above the bar on a terminal).
    """

    def __init__(self, *, total_steps: int, start_step: int, bar: bool | None = None):
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self._exit = ExitStack()
        self.bar = None
        if sys.stdout.isatty() if bar is None else bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                file=sys.stdout,
                dynamic_ncols=True,
                desc="step",
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}{postfix}]",
            )
            # Log lines go through the bar, so they print above it instead of breaking it.
            self._exit.enter_context(logging_redirect_tqdm())

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        for sample in metrics.get("samples", ()):
            log.info("  sample | %s -> %s", sample["prompt"], sample["completion"].strip()[:200])
        values = {k: v for k, v in metrics.items() if k != "samples"}
        if self.bar is not None and "loss" in values:
            self.bar.set_postfix_str(
                f"epoch {values['epoch']:.2f} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
                f"{values['tokens_per_sec']:,.0f} tok/s",
                refresh=False,
            )
            return
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{key} {_format(value)}" for key, value in values.items()]
        done = step - self.start_step
        if "loss" in values and done > 0:
            eta = (time.perf_counter() - self.started) / done * (self.total_steps - step)
            parts.append(f"eta {_duration(eta)}")
        log.info(" | ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._exit.close()


class JsonlTracker:
    """One JSON object per call in `metrics.jsonl`.

    A resumed run continues the same file: lines past the step it resumes from (logged after that checkpoint,
    before the run stopped) are dropped first, so every step appears once and in order.
    """

    def __init__(self, path: Path, *, start_step: int = 0):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in _read_lines(path) if line["step"] <= start_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The metrics file's objects; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            lines.append(line)
    return lines


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """A run's logged metrics, from its folder or its metrics file."""
    path = Path(run)
    return _read_lines(path / METRICS_FILE if path.is_dir() else path)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def load_dotenv_file() -> None:
    """Read WANDB_* settings from a .env file in this folder or a parent; the environment wins."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)


def _wandb_mode() -> tuple[WandbMode, str | None]:
    """wandb's mode, chosen before `wandb.init` so that it never prompts for a key or waits on a dead
    network: WANDB_MODE if set; offline without a key or without a reachable server; else online."""
    if set_mode := os.environ.get("WANDB_MODE"):
        if set_mode not in WANDB_MODES:
            raise ValueError(f"WANDB_MODE={set_mode!r} is not a wandb mode (choose {', '.join(WANDB_MODES)})")
        return WANDB_MODES[set_mode], None
    url = urlparse(os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL)
    host = url.hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        return "offline", "no WANDB_API_KEY (set it in .env or the environment)"
    try:
        socket.create_connection(
            (host, url.port or (443 if url.scheme == "https" else 80)), WANDB_PROBE_TIMEOUT
        ).close()
    except OSError as exc:
        return "offline", f"cannot reach {host} ({exc.strerror or type(exc).__name__})"
    return "online", None


def _netrc_has(host: str) -> bool:
    """`wandb login` keeps the key in ~/.netrc."""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker:
    """Logs the config, every metric (against tinylm's step) and the sample generations as a table.

    The run id is kept in the run folder, so a resumed run continues the same wandb run.
    """

    def __init__(self, run_dir: Path, *, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = json.loads(id_file.read_text())["id"]
        else:
            from wandb.sdk.lib.runid import generate_id

            run_id = generate_id()
            id_file.write_text(json.dumps({"id": run_id}) + "\n")
        mode, why = _wandb_mode()
        options = {
            "project": os.environ.get("WANDB_PROJECT") or "tinylm",
            "entity": os.environ.get("WANDB_ENTITY") or None,
            "name": run_dir.name,
            "config": config,
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
        }
        settings = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT, console="off", silent=True)
        try:
            self.run = wandb.init(mode=mode, settings=settings, **options)
        except Exception as exc:
            if mode != "online":
                raise
            mode, why = "offline", f"could not start online: {str(exc).strip().splitlines()[0][:120]}"
            self.run = wandb.init(mode=mode, settings=settings, **options)
        # Points logged after the last checkpoint of a stopped run come again after a resume: plotting
        # against tinylm's own step (not wandb's counter) puts them where they belong.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        if mode == "disabled":
            log.info("wandb: off (WANDB_MODE=disabled)")
        elif mode == "offline":
            log.info(
                "wandb: offline (%s); upload later with: wandb sync %s",
                why or "WANDB_MODE=offline",
                Path(self.run.dir).parent,
            )
        else:
            log.info("wandb: %s run %s", mode, getattr(self.run, "url", None) or run_id)

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        values: dict[str, Any] = {"step": step, **_numbers(metrics)}
        if metrics.get("samples"):
            rows = [[step, s["prompt"], s["completion"]] for s in metrics["samples"]]
            values["samples"] = self.wandb.Table(columns=["step", "prompt", "completion"], data=rows)
        self.run.log(values)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    def __init__(self, run_dir: Path, *, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a stopped run wrote after the checkpoint it resumes from.
        self.writer = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        log.info(
            "tensorboard: logging to %s (view with: tensorboard --logdir %s)",
            run_dir / "tensorboard",
            run_dir,
        )

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(key, value, step)
        for sample in metrics.get("samples", ()):
            self.writer.add_text("samples", f"**{sample['prompt']}** → {sample['completion']}", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Trackers:
    """The console (which also draws the progress bar) plus every other tracker, each call fanned out."""

    def __init__(self, console: ConsoleTracker, others: list[Tracker]):
        self.console = console
        self.trackers: list[Tracker] = [console, *others]

    def advance(self, step: int) -> None:
        self.console.advance(step)

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step=step)

    def close(self) -> None:
        for tracker in reversed(self.trackers):
            tracker.close()


class NoTrackers:
    """What the other processes of a torchrun job report to: nothing, as rank 0 alone reports."""

    def advance(self, step: int) -> None:
        pass

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def wandb_wanted(flag: bool) -> bool:
    """wandb logs when the config asks for it or a .env file (or the environment) names a WANDB_PROJECT."""
    load_dotenv_file()
    return flag or bool(os.environ.get("WANDB_PROJECT"))


def build_trackers(
    run_dir: Path,
    *,
    config: dict[str, Any],
    start_step: int,
    total_steps: int,
    wandb: bool = False,
    tensorboard: bool = False,
    bar: bool | None = None,
) -> Trackers:
    """Console and metrics.jsonl always; wandb and TensorBoard when asked for and installed."""
    console = ConsoleTracker(total_steps=total_steps, start_step=start_step, bar=bar)
    others: list[Tracker] = [JsonlTracker(run_dir / METRICS_FILE, start_step=start_step)]
    if wandb_wanted(wandb):
        try:
            others.append(WandbTracker(run_dir, config=config))
        except ImportError:
            log.info("wandb: off (not installed; pip install -e '.[wandb]')")
        except Exception as exc:
            log.info("wandb: off (%s)", str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc)
    if tensorboard:
        try:
            others.append(TensorBoardTracker(run_dir, start_step=start_step))
        except ImportError:
            log.info("tensorboard: off (not installed; pip install -e '.[tensorboard]')")
    return Trackers(console, others)
