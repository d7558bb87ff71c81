"""Where metrics go: the console and a local JSONL file always; optional trackers behind the same interface."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("tinylm")


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], *, step: int) -> None: ...

    def close(self) -> None: ...


class ConsoleTracker:
    """One human-readable line per logged step or evaluation, through `logging`."""

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        if "samples" in metrics:
            for sample in metrics["samples"]:
                log.info("  sample | %s -> %s", sample["prompt"], sample["completion"].strip()[:200])
        parts = [f"step {step}"]
        for key, value in metrics.items():
            if key == "samples":
                continue
            parts.append(f"{key} {_format(value)}")
        log.info(" | ".join(parts))

    def close(self) -> None:
        pass


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 100:
            return f"{value:,.0f}"
        if math.isfinite(value) and value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4f}"
    return str(value)


class JsonlTracker:
    """Appends one JSON object per call to `metrics.jsonl`, so a resumed run continues the same file."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Trackers:
    """Fans each call out to every configured tracker."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
