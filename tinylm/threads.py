"""How PyTorch's OpenMP threads wait between operations: chosen once, before torch loads, from how busy the
CPUs are.

A thread that spins after an operation picks up the next one at once, which is what a small model needs: its
step is hundreds of short operations, and threads that fall asleep after each one and must be woken for the
next make the demo's steps about twice as slow. A thread that spins beside other programs' work steals their
core and waits for partners that were descheduled, which made v2 training 2-5x slower on a shared machine
(docs/benchmarks.md, "Threads"). So threads spin briefly when the CPUs are idle at start and sleep at once
when they are not. What a user sets in OMP_WAIT_POLICY or GOMP_SPINCOUNT is left alone.
"""

from __future__ import annotations

import os
import sys
import time

# Busy-wait loops before a libgomp thread sleeps: longer than the gap between two of a step's operations,
# short enough that an idle server's threads are asleep almost at once.
SPIN_COUNT = "10000"
# Fewer busy CPUs than this (other programs' work, in CPUs' worth) counts as an idle machine.
IDLE_BELOW = 0.5
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def busy_cpus(sample_seconds: float = 0.1) -> float:
    """CPUs' worth of work running now: from /proc/stat over a short sample on Linux, elsewhere the
    one-minute load average (infinite where neither exists, so that threads sleep)."""
    try:
        before = _cpu_times()
        time.sleep(sample_seconds)
        after = _cpu_times()
    except OSError:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return float("inf")
    total, idle = (a - b for a, b in zip(after, before, strict=True))
    return (1 - idle / total) * (os.cpu_count() or 1) if total > 0 else 0.0


def _cpu_times() -> tuple[int, int]:
    """(all, idle) jiffies of every CPU since boot; idle counts I/O wait too."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(n) for n in stat.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def wait_settings(busy: float) -> dict[str, str]:
    """The environment variables to set: spin briefly on an idle machine, sleep at once on a busy one."""
    if busy < IDLE_BELOW:
        return {"GOMP_SPINCOUNT": SPIN_COUNT}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def choose_thread_waiting() -> None:
    """Set how threads wait, unless the user chose or torch has loaded (OpenMP reads the setting once, when
    it starts)."""
    if "torch" in sys.modules or any(name in os.environ for name in USER_SETTINGS):
        return
    os.environ.update(wait_settings(busy_cpus()))
