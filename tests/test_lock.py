"""One writer per run folder: a second writer stops at once and names the first."""

import subprocess
import sys
from pathlib import Path

import pytest

from dart_ee.core.errors import RunLockedError
from dart_ee.core.lock import run_lock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from dart_ee.core.lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock (it says so before the test goes on: no sleeps)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def test_second_writer_is_refused_and_named(holder, tmp_path):
    with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} on .* since"):
        with run_lock(tmp_path / "run"):
            pass


def test_cli_run_refuses_a_locked_folder(holder, tmp_path):
    from test_cli import invoke

    code, out = invoke("run", "--config", ROOT / "configs" / "mnist_alexnet_quick.yaml", "--out", tmp_path / "run")
    assert code == 2 and f"pid {holder.pid}" in out and "choose another --out" in out


def test_lock_is_released_and_reentrant(tmp_path):
    with run_lock(tmp_path / "r"):
        with run_lock(tmp_path / "r"):  # run -> train on the same folder, in one process
            pass
    with run_lock(tmp_path / "r"):  # released: taken again
        pass


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait(timeout=30)
    with run_lock(tmp_path / "run"):
        pass
