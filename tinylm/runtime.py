"""Where and how tensors run: device choice, the mixed-precision rule, seeding."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tinylm.config import ModelConfig


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


def has_fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix work beats float32 here: CUDA with bf16, or a CPU with AVX512-BF16 or AMX.

    Other CPUs convert bfloat16 in software, which is slower than float32; MPS autocast is not trusted for
    training here.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch.cpu reports the instruction sets cpuinfo found; absent on builds that predate them.
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def training_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`, or None for plain float32.

    "auto" uses bfloat16 only where it is fast; "bf16" asks for it wherever it runs correctly (not MPS).
    Weights, their gradients, the optimizer state and the loss stay float32 either way.
    """
    if precision == "fp32" or (precision == "auto" and not has_fast_bfloat16(device)):
        return None
    if device.type == "mps" or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        raise DeviceError(f"train.precision = bf16: bfloat16 training is not supported on {device.type} here")
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` (from `training_dtype`), or nothing for float32.

    On CPUs, SDPA's fused kernel is slower in bfloat16 than its plain matmul-softmax-matmul path (measured:
    benchmarks/train_throughput.py), so bfloat16 CPU training also selects that path.
    """
    if dtype is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=dtype))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def memory_budget(device: torch.device) -> int:
    """Bytes a training step's activations may take: a share of the device's memory, leaving room for the
    weights, gradients, optimizer state and everything else on the machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    if device.type == "mps":
        return torch.mps.recommended_max_memory() // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8


def available_memory(device: torch.device) -> int:
    """Bytes a new run may take on `device` now: free device memory, or on a CPU the memory the operating
    system reports as available (all of it where it reports none)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory()
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit_micro_batch(rows: int, bytes_per_row: int, device: torch.device) -> int:
    """The most rows (at most all `rows` of a step) whose activations fit `memory_budget`, at least one."""
    return max(1, min(rows, memory_budget(device) // max(bytes_per_row, 1)))


def activation_bytes_per_row(config: ModelConfig, *, checkpointing: bool) -> int:
    """A generous estimate of the memory one max_seq_length row keeps for the backward pass, in float32.

    Per layer and token: about 8 d_model-wide tensors (norms, q/k/v, attention output, residuals), 2
    d_ff-wide (feed-forward up and its activation) and n_heads x T attention weights (the plain attention
    path keeps them); doubled for autocast copies and the allocator's slack. Checkpointing keeps each
    layer's input only, plus one layer recomputed at a time.
    """
    per_layer = 8 * config.d_model + 2 * config.d_ff + config.n_heads * config.max_seq_length
    layers = 1 + config.n_layers * config.d_model / per_layer if checkpointing else config.n_layers
    return int(2 * 4 * per_layer * layers * config.max_seq_length)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS.

    By default glibc serves every block over 32 MB with a fresh mmap and unmaps it on free, so each training
    step page-faults its big buffers (logits chunks, the 50,257-row gradients) in again: measured at a
    fifth of a CPU step. Training allocates the same sizes every step, so keeping them costs no memory
    beyond the step's own peak. Elsewhere (macOS, musl) this does nothing.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
