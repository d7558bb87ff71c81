"""A training run's state: everything a resumed run continues from, and nothing else.

`TrainState` holds the model, the optimizer, the learning-rate schedule, the validation watch, the step and
the random states the step under way started from; `state_dict()` / `load_state_dict()` move all of it in
and out of a checkpoint. Which examples a step uses is a pure function of (seed, step), so the data
position needs nothing more: a run stopped and resumed computes exactly the losses of the run left alone.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tinylm.config import ModelConfig, TrainConfig
from tinylm.model import TinyLM
from tinylm.runtime import has_fast_bfloat16

logger = logging.getLogger(__name__)

# Evaluations without a new best validation loss, while training loss falls, before the run says it overfits.
OVERFIT_EVALS = 3


def learning_rate(step: int, train: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to learning_rate, then down to min_learning_rate at `total_steps`: along a cosine
    (train.schedule "cosine"), or held and then straight down over the last decay_fraction of the steps
    ("wsd"). Past `total_steps` it holds min_learning_rate."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    if train.schedule == "wsd":
        decay_steps = train.decay_fraction * total_steps
        if step < total_steps - decay_steps:
            return train.learning_rate
        left = max(0.0, (total_steps - step) / decay_steps)  # 1 where the decay starts, 0 at the end
    else:
        span = max(1, total_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        left = 0.5 * (1 + math.cos(math.pi * progress))
    return train.min_learning_rate + left * (train.learning_rate - train.min_learning_rate)


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
        if (
            self.warned
            or self.since_best < OVERFIT_EVALS
            or self.train_now is None
            or self.train_at_best is None
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


class CombinedOptimizer:
    """Several optimizers, each over its own parameters, driven as one: `param_groups` lists all their groups
    (so the schedule sets every rate), and one state dict holds them all, by name."""

    def __init__(self, **parts: torch.optim.Optimizer):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts.values() for group in part.param_groups]

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """KeyError or ValueError: a state of other optimizers."""
        if set(state) != set(self.parts):
            raise KeyError(f"optimizers {sorted(state)}, expected {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


Optimizer = torch.optim.Optimizer | CombinedOptimizer


def muon_parameters(model: TinyLM) -> list[nn.Parameter]:
    """The weight matrices inside the transformer blocks (attention and feed-forward): what Muon trains.
    The embeddings, the output layer, the norms' gains and the biases stay with AdamW."""
    return [p for p in model.blocks.parameters() if p.dim() == 2 and p.requires_grad]


def build_optimizer(model: TinyLM, train: TrainConfig, *, fused: bool | None = None) -> Optimizer:
    """AdamW with weight decay on matrices only: norms, biases and embeddings are not decayed. With
    train.optimizer "muon", the blocks' matrices (`muon_parameters`) go to Muon instead, scaled to AdamW's
    update size (Moonshot's match_rms_adamw) so that the same learning_rate and weight_decay suit both.

    fused None takes AdamW's fused kernel where PyTorch has one for the device (one pass over each tensor
    instead of a loop of small operations); False asks for AdamW's plain per-tensor loop.
    """
    muon = muon_parameters(model) if train.optimizer == "muon" else []
    to_muon = {id(p) for p in muon}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    embeddings = {id(model.embed.weight)}
    for param in model.parameters():
        if not param.requires_grad or id(param) in to_muon:
            continue
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        fused = next(model.parameters()).device.type in ("cpu", "cuda")
    options: dict[str, Any] = {"fused": True} if fused else {"fused": False, "foreach": False}
    adamw = torch.optim.AdamW(groups, lr=train.learning_rate, betas=(0.9, 0.95), **options)
    if train.optimizer == "adamw":
        return adamw
    device = next(model.parameters()).device
    if not has_fast_bfloat16(device):
        # torch.optim.Muon orthogonalises every update in bfloat16, whatever the device computes it in.
        logger.warning(
            "train.optimizer muon: this %s has no native bfloat16, and PyTorch's Muon computes its update in "
            "bfloat16, so each step will be much slower than with adamw (see docs/benchmarks.md)",
            device.type,
        )
    return CombinedOptimizer(
        adamw=adamw,
        muon=torch.optim.Muon(
            muon, lr=train.learning_rate, weight_decay=train.weight_decay, adjust_lr_fn="match_rms_adamw"
        ),
    )


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


@dataclass
class TrainState:
    """The run at a step. `step` counts the optimizer steps taken. While a step is under way,
    `rng_at_step_start` holds the random states it started from (what a save in the middle of it records),
    and `updating` is True while the optimizer changes the weights (then nothing consistent can be saved).
    """

    model: TinyLM
    optimizer: Optimizer
    schedule: LRSchedule
    watch: ValidationWatch = field(default_factory=ValidationWatch)
    step: int = 0
    rng_at_step_start: dict[str, Any] | None = None
    updating: bool = False

    @classmethod
    def create(
        cls,
        model_config: ModelConfig,
        train: TrainConfig,
        *,
        total_steps: int,
        device: torch.device,
        weights: dict[str, torch.Tensor] | None = None,
        fused_optimizer: bool | None = None,
    ) -> TrainState:
        """A fresh run's state on `device`: the model initialised (or given `weights`), step 0."""
        model = TinyLM(model_config)
        if weights is not None:
            model.load_state_dict(weights)
        model.to(device)
        return cls(
            model=model,
            optimizer=build_optimizer(model, train, fused=fused_optimizer),
            schedule=LRSchedule(train, total_steps),
            watch=ValidationWatch(patience=train.early_stopping_patience),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "watch": self.watch.state_dict(),
            "rng": self.rng_at_step_start or rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the random generators are set last, so nothing after this may draw from
        them before the next step. KeyError or ValueError: a state of another shape or version."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.watch.load_state_dict(state["watch"])
        self.step = state["step"]
        set_rng_state(state["rng"])
