"""How OpenMP threads wait: spin briefly on an idle machine, sleep on a busy one, the user's choice kept."""

import os
import subprocess
import sys

import pytest

from tinylm.threads import SPIN_COUNT, USER_SETTINGS, busy_cpus, wait_settings


def test_an_idle_machine_spins_briefly_and_a_busy_one_sleeps():
    assert wait_settings(0.1) == {"GOMP_SPINCOUNT": SPIN_COUNT}
    assert wait_settings(0.9) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert wait_settings(float("inf")) == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture
def busy_loop():
    """A process that keeps one CPU fully busy."""
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        loop.kill()
        loop.wait()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="samples /proc/stat (Linux)")
def test_busy_cpus_sees_a_busy_loop(busy_loop):
    busy = busy_cpus(0.3)
    assert 0.7 <= busy <= os.cpu_count()


CHOICE = "import os; from tinylm.threads import choose_thread_waiting; {setup}choose_thread_waiting(); " + (
    "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
)


def _chosen(setup: str = "", **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    code = CHOICE.format(setup=setup)
    return subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="samples /proc/stat (Linux)")
def test_threads_sleep_beside_other_work_and_a_user_setting_or_a_loaded_torch_wins(busy_loop):
    assert _chosen() == "PASSIVE None"
    assert _chosen(GOMP_SPINCOUNT="500") == "None 500"
    assert _chosen(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE None"
    # Once torch has loaded, OpenMP has read its settings: changing them would only mislead.
    assert _chosen(setup="import torch; ") == "None None"
