"""Sweep children as Ray tasks: on this machine's cores, or on a cluster.

Each task trains the child run the parent created (its id is in the job) against the tracking
store the driver uses, passed with the credentials as `runtime_env` environment variables
(a Ray worker is a fresh process: it would otherwise log to its own default store). MNIST's
four original files travel through Ray's object store, so a worker on another machine needs no
copy of the driver's `data_dir`; each task verifies them as the driver does. torch in a task
uses its CPU share (`--cpus-per-run`) as its thread count: children on one machine must not
fight over cores.

Ray is an optional extra (`pip install -e ".[ray]"`); this module imports it only when a
sweep runs with `--executor ray`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from mlflow.entities import RunStatus

from mnist_mlflow import store
from mnist_mlflow.config import ServerAway, UserError
from mnist_mlflow.data import RAW_FILES, verify_raw_files
from mnist_mlflow.store import RETRY_SETTINGS, absolute_uri
from mnist_mlflow.sweep import (
    TERMINAL,
    WORKER_DIED,
    ChildJob,
    ChildOutcome,
    end_unless_ended,
    stop_unfinished,
    train_child,
)

log = logging.getLogger("mnist_mlflow")

# What a task needs to reach the tracking store the driver uses, and as patiently.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS",
                 "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_REGISTRY_URI", *RETRY_SETTINGS)


def import_ray():  # noqa: ANN201 - the ray module
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install -e \".[ray]\"") from None
    return ray


def worker_env(tracking_uri: str) -> dict[str, str]:
    """The environment a task needs: the driver's tracking URI (a relative SQLite path made
    absolute: a worker starts in another folder) and its credentials."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env["MLFLOW_TRACKING_URI"] = absolute_uri(tracking_uri)
    # Each task logs its own epochs; Ray's log prefix says which worker.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mnist_blob(data_dir: Path | str) -> dict[str, bytes]:
    """MNIST's four original files, verified, as bytes for the object store (11.6 MB)."""
    raw_dir = Path(data_dir) / "MNIST" / "raw"
    present = verify_raw_files(raw_dir)
    missing = [name for name in RAW_FILES if name not in present]
    if missing:
        raise UserError(f"MNIST file {raw_dir / missing[0]} is missing: a Ray sweep sends the "
                        "four original .gz files to its workers; put them there")
    return {name: (raw_dir / name).read_bytes() for name in RAW_FILES}


def train_in_worker(job: ChildJob, blob: Mapping[str, bytes], threads: int,
                    progress: bool) -> ChildOutcome:
    """A task's body: MNIST from the object store into a private folder, then the job."""
    # --threads auto: its share of the machine, as Ray reserved it.
    share = (threads, f"auto: the {threads} CPU{'s' if threads > 1 else ''} its Ray task "
                      "reserved")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="mnist-mlflow-") as root:
        raw_dir = Path(root) / "MNIST" / "raw"
        raw_dir.mkdir(parents=True)
        for name, content in blob.items():
            (raw_dir / name).write_bytes(content)
        return train_child(job, root, progress, share)


class RayExecutor:
    """Each job a Ray task with `cpus_per_run` CPUs (and `gpus_per_run` GPUs): a local Ray
    started for the sweep when `address` is empty, else the cluster at `address`."""

    def __init__(self, address: str = "", cpus_per_run: int = 1, gpus_per_run: float = 0.0
                 ) -> None:
        if cpus_per_run < 1:
            raise UserError(f"invalid --cpus-per-run: must be >= 1, got {cpus_per_run}")
        if gpus_per_run < 0:
            raise UserError(f"invalid --gpus-per-run: must be >= 0, got {gpus_per_run}")
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        import_ray()  # a missing extra is one line, before any run is created

    def run(self, jobs: Sequence[ChildJob], data_dir: Path | str,
            progress: bool) -> Iterator[ChildOutcome]:
        if not jobs:
            return
        ray = import_ray()
        blob = mnist_blob(data_dir)
        client = store.client()
        started_here = not ray.is_initialized()
        if started_here:
            if not self.address:
                # Ray starts workers at nice 15, meant for idle prestarted ones; a training
                # task then gets no CPU beside any other busy process (measured here: a
                # worker beside one training run took minutes to import torch). Our tasks
                # are the work itself: same priority as the driver.
                os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address=self.address or None,
                     num_cpus=None if self.address else os.cpu_count(),
                     include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING,
                     runtime_env={"env_vars": worker_env(client.tracking_uri)})
        task = ray.remote(train_in_worker).options(
            num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run, max_retries=0)
        blob_ref = ray.put(blob)
        pending = {task.remote(job, blob_ref, self.cpus_per_run, False): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                yield self._outcome(ray, done[0], job)
        except BaseException as err:
            # Ctrl-C, the driver failing, or a child's server gone past MLflow's retries (the
            # other children would wait as long for it, each): stop every task still running;
            # their runs end KILLED with the checkpoint of their last epoch, resumable;
            # unstarted ones stay SCHEDULED.
            for ref in pending:
                ray.cancel(ref, force=True)
            stop_unfinished(pending.values(), err)
            raise
        finally:
            if started_here:
                ray.shutdown()

    def _outcome(self, ray, ref, job: ChildJob) -> ChildOutcome:  # noqa: ANN001 - Ray types
        """The task's outcome. A task whose worker died (kill -9, out of memory, its node
        gone) ends its run KILLED, resumable from its checkpoint by `sweep --resume`, as in a
        local sweep; one that raised otherwise ends FAILED with the reason."""
        died = tuple(getattr(ray.exceptions, name) for name in (
            "WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "OutOfMemoryError")
            if hasattr(ray.exceptions, name))
        try:
            return ray.get(ref)
        except ServerAway as err:  # Ray's error is the child's too: say the child's words
            raise getattr(err, "cause", err) from None
        except died:
            log.error("child %s: %s", job.config.run_name, WORKER_DIED)
            end_unless_ended(job.run_id, RunStatus.KILLED, WORKER_DIED, keep_scheduled=True)
            status = store.client().get_run(job.run_id).info.status
            return ChildOutcome(job.config, job.run_id, status, WORKER_DIED)
        except ray.exceptions.RayError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
            reason = f"{type(err).__name__}: {first}"
            log.error("child %s failed in its Ray task: %s", job.config.run_name, reason)
            end_unless_ended(job.run_id, RunStatus.FAILED, reason)
            status = store.client().get_run(job.run_id).info.status
            return ChildOutcome(job.config, job.run_id, status if status in TERMINAL
                                else "FAILED", reason)
