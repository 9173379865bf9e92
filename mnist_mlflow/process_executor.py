"""Sweep children side by side in processes of this machine: the standard library's pool.

A worker is a spawned Python process (a fork would copy MLflow's threads and torch's pools
mid-state) that trains one child at a time with its share of the cores (passed down to
`runtime.resolve`), logging to the same tracking store as the sweep. What a sweep promises
holds here too:

- Ctrl-C or SIGTERM reaches the sweep alone (workers run in their own process group), which
  passes it on, once, to each worker: the child in training ends KILLED with the checkpoint
  of its last epoch, a child that had not begun stays SCHEDULED, and the sweep waits for
  them all before it ends its parent KILLED with the resume command. A second signal
  meanwhile is held.
- A worker that dies (kill -9, out of memory) breaks the pool: its child ends KILLED (its
  checkpoint is kept; `sweep --resume` goes on from it), the pool stops the others the same
  way, and the children that never began are handed to a new pool.
- A sweep that dies without a word (kill -9) leaves no worker behind: each watches its parent
  process and stops its child KILLED when the parent is gone.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus

from mnist_mlflow.config import ServerAway, Terminated, raise_terminated
from mnist_mlflow.mlrun import MlflowRun
from mnist_mlflow.record import signals_deferred
from mnist_mlflow.store import absolute_uri
from mnist_mlflow.sweep import (
    SCHEDULED,
    WORKER_DIED,
    ChildJob,
    ChildOutcome,
    LocalExecutor,
    SweepPlan,
    end_unless_ended,
    plan_sweep,
    stop_unfinished,
    train_child,
)
from mnist_mlflow.tracking import RunInterrupted

log = logging.getLogger("mnist_mlflow")

# How often a worker checks that its sweep is still there.
PARENT_WATCH_S = 1.0
# A pool broken this many times in one sweep is not a passing accident: stop handing it work.
MAX_BROKEN_POOLS = 3


class ProcessExecutor:
    """Children side by side in worker processes, as many as `sweep.plan_sweep` says for
    `--workers` (0: auto) and the children's `--threads`; one child left (or one core free)
    trains in this process, as `LocalExecutor` does."""

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers
        self.plan: SweepPlan | None = None  # what the last `run` chose, for the caller to say

    def run(self, jobs: Sequence[ChildJob], data_dir: Path | str,
            progress: bool) -> Iterator[ChildOutcome]:
        if not jobs:
            return
        self.plan = plan = plan_sweep(len(jobs), jobs[0].config.threads, self.workers)
        log.info("sweep: %s", plan.reason)
        if plan.workers == 1:
            yield from LocalExecutor().run(jobs, data_dir, progress)
            return
        queue = list(jobs)
        for _attempt in range(MAX_BROKEN_POOLS):
            queue = yield from self._run_pool(queue, data_dir, plan)
            if not queue:
                return
        for job in queue:  # never began: they stay SCHEDULED for `sweep --resume`
            yield ChildOutcome(job.config, job.run_id, SCHEDULED,
                               f"not started: the worker pool broke {MAX_BROKEN_POOLS} times")

    def _run_pool(self, jobs: Sequence[ChildJob], data_dir: Path | str,
                  plan: SweepPlan) -> Iterator[ChildOutcome]:
        """Train `jobs` in one pool; return those that never began if the pool broke."""
        # A file, not a multiprocessing.Event: a killed worker leaves no semaphore behind.
        stop = Path(tempfile.mkdtemp(prefix="mnist-mlflow-sweep-")) / "stop"
        # A worker killed while it held the pool's queue leaves that queue's semaphore to
        # multiprocessing's resource tracker, which frees it and warns on the terminal after
        # our last line. Freeing it is its job: the warning is noise (set before the pool
        # starts the tracker, which inherits the environment).
        os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
        pool = ProcessPoolExecutor(
            max_workers=plan.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(absolute_uri(mlflow.get_tracking_uri()),
                      absolute_uri(mlflow.get_registry_uri()), os.getpid()))
        pending: dict[Future[ChildOutcome], ChildJob] = {
            pool.submit(_train_in_worker, job, str(data_dir), plan.threads, plan.reason,
                        str(stop), os.getpid()): job
            for job in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        pending[future] = job
                        return (yield from self._after_broken_pool(pool, pending))
                    except RunInterrupted as err:  # someone signalled that worker alone
                        outcome = ChildOutcome(job.config, job.run_id, "KILLED", str(err))
                    yield outcome
            pool.shutdown()
            return []
        except KeyboardInterrupt as err:
            # Ctrl-C or SIGTERM: pass it on to the workers and wait until every child has
            # ended or is back to SCHEDULED; then say which child stopped where.
            interrupted = _stop_workers(pool, stop, pending, err)
            if interrupted is not None:
                raise interrupted from err
            raise
        except ServerAway as err:
            # A child's server did not answer through MLflow's retries; the other children
            # would each wait as long for it. Stop them at once: each keeps the checkpoints
            # of its finished epochs, as a worker that died would.
            _kill_workers(pool, stop)
            stop_unfinished(pending.values(), err)
            raise
        except BaseException:  # this sweep failed, or stopped reading: no orphan workers
            _stop_workers(pool, stop, pending, Terminated("SIGTERM"))
            raise
        finally:
            shutil.rmtree(stop.parent, ignore_errors=True)

    def _after_broken_pool(self, pool: ProcessPoolExecutor,
                           pending: dict[Future[ChildOutcome], ChildJob]
                           ) -> Iterator[ChildOutcome]:
        """A worker died: end its child KILLED, report the others as they ended, and return
        the jobs that never began."""
        pool.shutdown(wait=True)  # the pool has stopped the other workers: let them end
        unstarted = []
        for job in pending.values():
            client = MlflowRun(job.run_id).client
            status = client.get_run(job.run_id).info.status
            if status == SCHEDULED:
                unstarted.append(job)
                continue
            reason = ""
            if status == "RUNNING":  # the child of the worker that died
                log.error("child %s: %s", job.config.run_name, WORKER_DIED)
                end_unless_ended(job.run_id, RunStatus.KILLED, WORKER_DIED)
                status, reason = client.get_run(job.run_id).info.status, WORKER_DIED
            yield ChildOutcome(job.config, job.run_id, status, reason)
        return unstarted


def _stop_workers(pool: ProcessPoolExecutor, stop: Path,
                  pending: dict[Future[ChildOutcome], ChildJob],
                  err: BaseException) -> RunInterrupted | None:
    """Signal each worker once, wait for their children to end; the first child's
    RunInterrupted (which names its run and epoch), if one was in training."""
    with signals_deferred(deliver=False):  # a second Ctrl-C must not cut this short
        # A worker between two children takes no new one; the file names the sweep's signal.
        stop.write_text("SIGTERM" if isinstance(err, Terminated) else "SIGINT")
        # Passed on as SIGINT whatever it was: a worker between two children ignores that,
        # where SIGTERM would end it, maybe while it holds the pool's queue lock; Python
        # 3.11's pool then waits forever for the worker that next needs the lock.
        _signal_workers(signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
    first = None
    for future, job in pending.items():
        if future.cancelled():
            continue
        try:
            future.result()
        except RunInterrupted as interrupted:
            first = first or interrupted
        except Exception as failure:  # noqa: BLE001 - the child's run records it
            log.error("child %s: %s", job.config.run_name, failure)
    return first


def _kill_workers(pool: ProcessPoolExecutor, stop: Path) -> None:
    """Stop every worker now (SIGKILL): its child's run keeps RUNNING with a lease naming a
    process that is gone, which `sweep --resume` takes."""
    stop.touch()  # a worker about to take a child begins none
    _signal_workers(signal.SIGKILL)
    pool.shutdown(wait=True, cancel_futures=True)


def _signal_workers(signum: int) -> None:
    for process in multiprocessing.active_children():
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:  # it had just ended
            pass


def _start_worker(tracking_uri: str, registry_uri: str, parent_pid: int) -> None:
    """A new worker: the sweep's store, its own process group, signals only when training."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    # The terminal's Ctrl-C goes to the sweep, which passes it on once: a signal from both
    # could reach a child while it ends its run.
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # between children; training takes it
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    """Stop this worker's child (KILLED, resumable) once the sweep that started it is gone."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_WATCH_S)
    os.kill(os.getpid(), signal.SIGTERM)


def _stopped_by_sweep(stop: Path, signum: int, frame: object) -> None:
    """The sweep's stop, which always comes as SIGINT: raised as the signal the sweep got
    (its stop file, `stop`, says which), so the child's run says what stopped it."""
    if stop.exists() and stop.read_text() == "SIGTERM":
        raise_terminated(signum, frame)
    signal.default_int_handler(signum, frame)


def _train_in_worker(job: ChildJob, data_dir: str, threads: int, reason: str,
                     stop_file: str, parent_pid: int) -> ChildOutcome:
    """One child in this worker, with its share of the cores; its lines carry its name.
    `stop_file` is how the sweep (process `parent_pid`) asks its workers to begin no child."""
    stop = Path(stop_file)
    handler = logging.getLogger().handlers[0]
    handler.setFormatter(logging.Formatter(f"[{job.config.run_name}] %(message)s"))
    signal.signal(signal.SIGINT, functools.partial(_stopped_by_sweep, stop))
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        if stop.exists():  # the sweep stopped before this one began
            return ChildOutcome(job.config, job.run_id, SCHEDULED)
        return train_child(job, data_dir, progress=False,
                           share=(threads, reason) if threads else None)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getppid() != parent_pid:  # the sweep is gone: no one to report to
            os._exit(1)
