"""`--threads auto`: each run takes the cores free when it starts, and says so (what a run
records of it: tests/test_pipeline.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from mnist_mlflow.runtime import auto_threads, resolve_threads
from mnist_mlflow.sweep import parse_workers, plan_sweep
from tests.conftest import tiny_config


@pytest.mark.parametrize(("cores", "busy", "threads"), [
    (2, 0.0, 2), (2, 0.3, 2), (2, 1.0, 1), (2, 1.6, 1), (2, 5.0, 1), (16, 3.4, 13), (1, 0.0, 1),
])
def test_auto_takes_the_free_cores_and_at_least_one(cores: int, busy: float,
                                                    threads: int) -> None:
    assert auto_threads(cores, busy) == threads


@pytest.fixture
def one_core_busy(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The cores this process may use, while another process keeps one of them busy."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: auto always takes it")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)  # running, and counted by /proc/stat
        yield cores
    finally:
        spinner.kill()
        spinner.wait()


def test_auto_leaves_a_core_that_another_process_keeps_busy(one_core_busy: int) -> None:
    cores = one_core_busy
    count, why = resolve_threads("auto")
    assert 1 <= count <= cores - 1
    assert why.startswith(f"auto: {count} of {cores} cores free")


def test_omp_num_threads_caps_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads("auto") == (1, "auto: OMP_NUM_THREADS=1")
    assert resolve_threads("3") == (3, "--threads 3")


@pytest.mark.parametrize("value", ["two", "-1", "1.5", ""])
def test_a_bad_threads_value_is_one_line_before_any_run(value: str) -> None:
    from mnist_mlflow.config import UserError

    with pytest.raises(UserError, match=r"invalid threads: must be auto or a count >= 0"):
        tiny_config(threads=value).validate()


@pytest.mark.parametrize(("children", "threads", "workers", "plan"), [
    (4, "auto", 2, (2, 0, "--workers 2: 2 children side by side")),  # share: see below
    (1, "auto", 3, (1, 0, "--workers 3: one child after another")),
    (3, "2", 2, (2, 0, "--workers 2: 2 children side by side with 2 threads each, as set")),
    (5, "auto", 1, (1, 0, "--workers 1: one child after another")),
])
def test_a_sweep_plan_says_how_many_children_run_together_and_their_threads(
        monkeypatch: pytest.MonkeyPatch, children: int, threads: str, workers: int,
        plan: tuple[int, int, str]) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    got = plan_sweep(children, threads, workers)
    assert got.workers == plan[0]
    assert got.reason.startswith(plan[2])
    if threads == "auto" and got.workers > 1:  # the free cores shared out, at least one each
        assert got.threads >= 1 and got.reason.endswith(
            f"with {got.threads} thread{'s' if got.threads > 1 else ''} each")
    else:
        assert got.threads == 0  # each child's own setting stands


def test_auto_workers_leave_a_core_that_another_process_keeps_busy(one_core_busy: int) -> None:
    cores = one_core_busy
    busy = plan_sweep(cores, "auto", 0)
    assert 1 <= busy.workers <= cores - 1
    assert busy.reason.startswith("auto: ") and f"of {cores} cores free" in busy.reason


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_workers_value_is_one_line(value: str) -> None:
    from mnist_mlflow.config import UserError

    with pytest.raises(UserError, match=r"invalid --workers .*: must be auto or a count >= 1"):
        parse_workers(value)
