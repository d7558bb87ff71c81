"""Where and how tensors run: device choice, the mixed-precision rule, seeding."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


class DeviceError(RuntimeError):
    """The asked-for device is not available on this machine."""


def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU for "auto"; an explicit choice that is not available fails in one line."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available (this torch build or machine has none)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps: Apple's MPS backend is not available on this machine")
    if name not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {name!r} (choose auto, cpu, cuda or mps)")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA only; never on MPS or CPU by this rule.

    GPUs without bfloat16 train in float32: float16 would need loss scaling for these small gradients.
    """
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
