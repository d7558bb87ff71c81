"""Training one model on several processes, started by `torchrun`: who this process is, its device, and the
few collective operations the trainer needs (DistributedDataParallel, sums across processes, a barrier).

torchrun tells each process its place through RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT
for the rendezvous). Without them (a plain `tinylm train`) the world has one process and every helper here
is a no-op, so the single-process run computes exactly what it did before.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn, ParamSpec, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tinylm.runtime import DeviceError, pick_device

log = logging.getLogger("tinylm")

# How long a process waits for the others to join or to reach the same collective before it fails instead
# of hanging: longer than rank 0's own work between two steps (samples, a checkpoint save, the plot).
TIMEOUT = timedelta(minutes=10)

T = TypeVar("T")
P = ParamSpec("P")


class Objective(nn.Module):
    """The model and its loss as one module: DDP synchronises gradients through hooks on `forward`, and
    `loss(model, inputs, targets)` calls the model's parts (hidden states, then the head at the targets)."""

    def __init__(self, model: nn.Module, loss: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, **options: Any) -> Any:
        return self.loss(self.model, inputs, targets, **options)


@dataclass
class World:
    """This process's place among the `size` processes of a run; rank 0 alone writes and reports."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls) -> World:
        """Read torchrun's variables; reading them starts nothing (`start` joins the process group)."""
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            size=int(os.environ.get("WORLD_SIZE", 1)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def pick_device(self, name: str) -> torch.device:
        """`runtime.pick_device`, and under torchrun the GPU of this process's local rank."""
        device = pick_device(name)
        if self.size > 1 and device.type == "cuda":
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise DeviceError(
                    f"LOCAL_RANK {self.local_rank}, but this machine has {count} CUDA device(s): start at "
                    f"most {count} processes on it (torchrun --nproc_per_node={count})"
                )
            device = torch.device("cuda", self.local_rank)
        if self.size > 1 and device.type == "mps":
            raise DeviceError("torchrun: MPS cannot share one model across processes; use --device cpu")
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group: NCCL between GPUs, gloo between CPUs. Waits (up to TIMEOUT) for all."""
        self.device = device
        if self.size == 1:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
        if not self.is_main:  # the others compute what rank 0 reports; they speak only to fail
            log.setLevel(logging.ERROR)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This process's contiguous share of `items`: shares differ in length by at most one."""
        n = len(items)
        return items[self.rank * n // self.size : (self.rank + 1) * n // self.size]

    def sum(self, *values: float) -> tuple[float, ...]:
        """Each value added up over all processes (float64, so counts stay exact)."""
        if self.size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return tuple(total.tolist())

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one: for decisions all must take together."""
        return self.sum(float(flag))[0] > 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Local rank 0 of each machine runs the block first (and fills the data cache); then the others run
        it and find the work done."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def wrap(self, model: nn.Module, loss: Callable[..., Any]) -> nn.Module:
        """`Objective(model, loss)`, in DDP when there are several processes. DDP makes every process start
        from rank 0's weights, and averages the gradients across processes in the backward pass."""
        objective = Objective(model, loss)
        if self.size == 1:
            return objective
        return DistributedDataParallel(
            objective,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,  # the only buffers are constant tables
        )

    @staticmethod
    def accumulating(objective: nn.Module, skip_sync: bool) -> AbstractContextManager:
        """DDP's `no_sync` for every micro-batch of a step but the last: their gradients add up locally, and
        the last one's backward all-reduces the sum once."""
        if skip_sync and isinstance(objective, DistributedDataParallel):
            return objective.no_sync()
        return nullcontext()


def record_errors(main: Callable[P, int]) -> Callable[P, int]:
    """torchrun's `@record` around a process's main function: an exception is written to the error file
    torchrun names, so its summary shows which rank failed first and its traceback (outside torchrun it
    only re-raises). `@record` turns `sys.exit(0)` into a return of None: that is exit code 0 here."""
    from torch.distributed.elastic.multiprocessing.errors import record

    recorded = record(main)

    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> int:
        code = recorded(*args, **kwargs)
        return 0 if code is None else code

    return run


def exit_process(code: int) -> NoReturn:
    """End a finished process of a torchrun job at once, its output flushed, skipping the interpreter's
    teardown.

    Once DDP has used the process group, its gloo threads outlive destroy_process_group (and the DDP
    module and model being freed), so they are torn down during interpreter exit, where that can abort
    the process (SIGABRT: "terminate called without an active exception") after all its work is done,
    with no Python traceback: torchrun then reports a lost worker and fails the job (about 1 run in 15-40
    here). Skipping the teardown also spares a stopped run's processes seconds of garbage collection.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
