"""Loss curves: training and validation loss and perplexity against step, for one run or several on one chart.

Training redraws its run's `loss.png` at each evaluation; `tinylm plot RUN...` compares runs. Matplotlib's
object API draws without pyplot, so no window, backend or global state is involved.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from tinylm.tracking import METRICS_FILE, read_metrics


class PlotError(ValueError):
    """A run to plot that has no metrics; the message names it."""


def plot_runs(runs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None) -> Path:
    """Draw the runs (folders or metrics files) into one PNG, written atomically so a viewer never sees half
    of it."""
    from matplotlib.figure import Figure

    out = Path(out)
    fig = Figure(figsize=(12, 4.5))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.92, wspace=0.2)
    ax_loss, ax_ppl = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for index, (run, color) in enumerate(zip(runs, colors, strict=True)):
        metrics = read_metrics(run)
        if not metrics:
            raise PlotError(f"{run}: no metrics to plot (expected {METRICS_FILE} with logged steps)")
        name = f"{labels[index] if labels else run} " if len(runs) > 1 or labels else ""
        for key, style, what in (("loss", "-", "train"), ("val_loss", "o--", "validation")):
            points = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), int | float)]
            if not points:
                continue
            steps = [s for s, _ in points]
            losses = [v for _, v in points]
            ax_loss.plot(steps, losses, style, color=color, label=f"{name}{what}", markersize=4)
            ax_ppl.plot(steps, [math.exp(min(v, 50.0)) for v in losses], style, color=color, markersize=4)
    ax_loss.set(xlabel="step", ylabel="loss (cross-entropy per token)", title="loss")
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
    ax_loss.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out)
    return out
