"""Training recorded in MLflow: `train` is the one entry every way of starting training
calls (`train`, `mlflow run`, a sweep's child on any executor, resume, reproduce), and each
run being trained records its params, per-epoch metrics, checkpoints, plots, log and model.

What a run records is written by its `RunRecord` (record.py) through `MlflowRun` (mlrun.py);
the loop itself (training.py) only returns numbers. This module starts training and decides
what an interruption, a full disk or a tracking server gone does to the runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_mlflow import codestate, store
from mnist_mlflow.config import (
    RUNTIME_SETTINGS,
    DiskFull,
    ServerAway,
    TrainConfig,
    UserError,
    mount_of,
)
from mnist_mlflow.data import MnistData, Pipeline, build_pipeline, load_mnist
from mnist_mlflow.mlrun import MlflowRun, lease_of
from mnist_mlflow.record import (
    EXPERIMENT_TAGS,
    RunRecord,
    checkpoints,
    load_checkpoint,
    log_missing_epochs,
    run_params,
    settings_record,
    signals_deferred,
)
from mnist_mlflow.runtime import Share, resolve
from mnist_mlflow.schema import (
    COMPILE_FALLBACK_TAG,
    COMPILED_TAG,
    DEFAULT_EXPERIMENT,
    FAILURE_REASON_TAG,
    QUEUED_TAG,
    RESUMED_AFTER_TAG,
    RESUMED_ON_TAG,
    RESUMES_RUN_TAG,
    ROLE_TAG,
    STACKED_TAG,
    TRAIN_ROLE,
    TRAINING_LOG,
    config_from_params,
    settings_of,
)
from mnist_mlflow.stacked import StackedSeeds
from mnist_mlflow.store import (
    disk_full,
    open_store,
    server_away,
    server_away_reason,
    without_retries,
)
from mnist_mlflow.training import (
    EpochMetrics,
    SoloSeed,
    TrainState,
    create_state,
    fit_seeds,
)

log = logging.getLogger("mnist_mlflow")


@dataclass(frozen=True)
class RunResult:
    run_id: str
    history: list[EpochMetrics]


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped a run, which ended KILLED with its last checkpoint kept; or came
    while it finished (`finished`), and it ended FINISHED all the same."""

    def __init__(self, signal_name: str, run_id: str, epoch: int, epochs: int,
                 command: str, exit_code: int, finished: bool = False) -> None:
        super().__init__(signal_name, run_id, epoch, epochs, command, exit_code, finished)
        self.signal_name = signal_name
        self.run_id = run_id
        self.epoch = epoch
        self.epochs = epochs
        self.command = command  # a sweep puts its own in place of the child's
        self.exit_code = exit_code
        self.finished = finished

    def __str__(self) -> str:
        if self.finished:
            return (f"{self.signal_name} while run {self.run_id} was finishing; it ended "
                    f"FINISHED with all {self.epochs} epochs and its model: nothing to resume")
        return (f"{self.signal_name} after epoch {self.epoch} of {self.epochs}; run "
                f"{self.run_id} ended KILLED; resume it with: {self.command}")


def resume_command(run_id: str, under_mlflow_run: bool) -> str:
    """The command that resumes `run_id`, in the form the user started it."""
    if under_mlflow_run:
        return f"mlflow run . -e main -P resume={run_id}"
    return f"mnist-mlflow train --resume {run_id}"


@dataclass(frozen=True)
class Training:
    """What to train. Either `configs` (one, or seeds of one configuration, trained stacked
    in the same passes and each recorded as if alone) into new runs or into `runs` made
    already (a sweep's SCHEDULED children, `reproduce`'s new run), with `tags` added; or
    `resume`, a run to go on with from its checkpoint, with the options the user set
    (`given`: they must agree with its params, but for how it runs). `until` stops after that
    epoch (the first epochs of the whole recipe: `reproduce --epochs`)."""

    configs: tuple[TrainConfig, ...] = ()
    runs: tuple[str, ...] = ()
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    until: int = 0
    resume: str = ""
    given: Mapping[str, object] = dataclasses.field(default_factory=dict)
    # The share of the machine a sweep gave these runs: what `--threads auto` takes.
    share: Share | None = None


@dataclass(frozen=True)
class Destination:
    """Where to record: new runs go to `experiment`, or the first to the run `mlflow run`
    made for this process (`runner_run_id`). A resume stays in its run's experiment, which
    `experiment` must name when `experiment_given`. `patient`: a sweep's child, which waits
    for a tracking server that is restarting."""

    experiment: str = DEFAULT_EXPERIMENT
    runner_run_id: str | None = None
    experiment_given: bool = False
    patient: bool = False


def train(what: Training, data_dir: Path | str, where: Destination = Destination(),
          progress: bool = True) -> list[RunResult]:
    """The one way training starts (`train`, `mlflow run`, a sweep's child on any executor,
    resume, reproduce): validate, load the data, train and record each run; their results."""
    if what.resume:
        return [_resume(what.resume, data_dir, what.given, progress, where, what.share)]
    if not what.configs or (len(what.configs) > 1 or what.runs) and (
            len(what.runs) != len(what.configs)):
        raise ValueError("Training needs configs; stacked seeds, or runs made already, need "
                         "one run for each config")
    return _train_new(what, data_dir, where, progress)


def _train_new(what: Training, data_dir: Path | str, where: Destination,
               progress: bool) -> list[RunResult]:
    """Train `what.configs` into new runs (or its runs), stacked when there are several."""
    configs = [c.validate() for c in what.configs]
    config = configs[0]
    run = MlflowRun(what.runs[0]) if what.runs else None
    runner_run_id, until = where.runner_run_id, what.until
    stacked_with = [(other, MlflowRun(run_id))
                    for other, run_id in zip(configs[1:], what.runs[1:], strict=True)]
    runtime = resolve(config, what.share)
    open_store(patient=where.patient)
    data = load_mnist(data_dir, config.train_limit, config.test_limit, config.val_size)
    pipeline = build_pipeline(config, data, runtime)
    tags = {ROLE_TAG: TRAIN_ROLE, **what.tags}
    if stacked_with:
        if runtime.compile:  # vmap'd functional calls are not compiled here
            runtime = dataclasses.replace(runtime, compile=False,
                                          compile_reason="stacked seeds: eager (vmap)")
        stack = StackedSeeds(configs, runtime, pipeline.steps_per_epoch)
        states = stack.states
        tags[STACKED_TAG] = ",".join(str(c.seed) for c in configs)
    else:
        states = [create_state(config, runtime, pipeline.steps_per_epoch)]
    made_here = run is None
    if run is None:
        run = MlflowRun.create_or_adopt(
            runner_run_id, where.experiment, config.run_name, tags=tags,
            experiment_tags=EXPERIMENT_TAGS)
    runs = [run, *(other_run for _, other_run in stacked_with)]
    for index, (member, state) in enumerate(zip(runs, states, strict=True)):
        if index or not made_here:  # made before (SCHEDULED by a sweep, say): tag it now
            own = dict(tags)
            info = member.client.get_run(member.run_id).info
            if info.status == "SCHEDULED":  # a sweep's child, waiting until now
                own[QUEUED_TAG] = f"{max(0.0, time.time() - info.start_time / 1000):.1f}"
            member.reopen()
            member.set_tags(own)
        # At once: a run killed from here on can be resumed (or started over) from its params.
        member.log_new_params(run_params(configs[index], state, data))

    def fit_them(on_epoch: Callable[[int, EpochMetrics, TrainState], None],
                 on_fallback: Callable[[str], None]) -> None:
        seeds = stack if stacked_with else SoloSeed(config, states[0], on_fallback)
        fit_seeds(seeds, pipeline, on_epoch, progress, until)

    with contextlib.ExitStack() as folders:
        recordings = [
            RunRecord(member, member_config, state, [],
                       resume_command(member.run_id, runner_run_id is not None),
                       Path(folders.enter_context(tempfile.TemporaryDirectory())))
            for member, member_config, state in zip(runs, configs, states, strict=True)]
        return _train_in_runs(recordings, data, pipeline, fit_them)


def _resume(run_id: str, data_dir: Path | str, given: Mapping[str, object], progress: bool,
            where: Destination, share: Share | None = None) -> RunResult:
    """Reopen run `run_id`, restore its checkpoint and train the epochs it has left.

    Settings come from the run's params; `given` (options the user set) must agree with them,
    except how it runs (device, precision, compile, threads, determinism), which may change:
    a run may go on on another kind of machine. Every check happens before the run is
    touched: a refused resume changes nothing. The run `mlflow run` made for this command
    (`where.runner_run_id`) only records that it resumed `run_id`. A run that never reached
    a checkpoint starts over in the same run.
    """
    open_store(patient=where.patient)
    client = store.client()
    found, has_checkpoint = resumable_run(client, run_id)
    if where.experiment_given:
        actual = client.get_experiment(found.info.experiment_id).name
        if actual != where.experiment:
            raise UserError(f"--experiment {where.experiment} conflicts with run {run_id}, "
                            f"which is in experiment {actual}; leave it out to resume")
    given = dict(given or {})
    overrides = {name: given.pop(name) for name in RUNTIME_SETTINGS if name in given}
    config = dataclasses.replace(config_from_params(run_id, settings_of(found), given),
                                 **overrides)
    if config.device == "cuda" and "device" not in overrides and not torch.cuda.is_available():
        raise UserError(f"run {run_id} trained with --device cuda and CUDA is not available "
                        "here; resume it with --device cpu")
    runtime = resolve(config, share)
    data = load_mnist(data_dir, config.train_limit, config.test_limit, config.val_size)
    pipeline = build_pipeline(config, data, runtime)
    state = create_state(config, runtime, pipeline.steps_per_epoch)
    history: list[EpochMetrics] = []
    if has_checkpoint:
        checkpoint = load_checkpoint(client, run_id)
        state.load_state_dict(checkpoint["state"])
        history = [EpochMetrics.from_record(m) for m in checkpoint["history"]]
    runner_run_id = where.runner_run_id
    if runner_run_id:
        MlflowRun.adopt(runner_run_id, f"resume-{run_id[:8]}", {RESUMES_RUN_TAG: run_id})
    run = MlflowRun(run_id, client)
    run.reopen()
    if FAILURE_REASON_TAG in found.data.tags:  # it is going on: the interruption is no failure
        run.delete_tag(FAILURE_REASON_TAG)
    resumed_at = found.data.tags.get(RESUMED_AFTER_TAG, "")
    # The resolved_* tags now say how it goes on; resumed_on keeps where each resumption ran.
    resumed_on = found.data.tags.get(RESUMED_ON_TAG, "")
    here = f"after epoch {state.epoch}: {runtime.describe()}, {codestate.current().describe()}"
    run.set_tags({**runtime.tags(),
                  **settings_record(config)[1],
                  RESUMED_AFTER_TAG: ",".join(filter(None, [resumed_at, str(state.epoch)])),
                  RESUMED_ON_TAG: "; ".join(filter(None, [resumed_on, here]))})
    logged = log_missing_epochs(run, history)
    log.info("run %s: resuming %s after epoch %d of %d", run_id, run.name, state.epoch,
             config.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        def fit_it(on_epoch: Callable[[int, EpochMetrics, TrainState], None],
                   on_fallback: Callable[[str], None]) -> None:
            fit_seeds(SoloSeed(config, state, on_fallback), pipeline, on_epoch, progress)
        recording = RunRecord(run, config, state, history,
                               resume_command(run_id, runner_run_id is not None), Path(tmp),
                               resumed=bool(history), logged=logged)
        return _train_in_runs([recording], data, pipeline, fit_it)[0]


def resumable_run(client: MlflowClient, run_id: str) -> tuple[Run, bool]:
    """The run to resume and whether it has a checkpoint; UserError when it is unknown,
    FINISHED, being trained by a live process, or FAILED before its first checkpoint.

    A KILLED run without a checkpoint (or a RUNNING one whose process is gone) starts over
    in the same run.
    """
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id!r} in the tracking store "
                        f"{mlflow.get_tracking_uri()}") from None
    if run.info.status == "FINISHED":
        raise UserError(f"run {run_id} is FINISHED: there is nothing left to resume")
    lease = lease_of(run)
    if lease is not None and lease.alive:
        raise UserError(f"run {run_id} is being trained right now ({lease.describe()}); "
                        "one run has one trainer: stop that process first")
    has_checkpoint = bool(checkpoints(client, run_id))
    if not has_checkpoint and run.info.status == "FAILED":
        raise UserError(f"run {run_id} FAILED before its first checkpoint "
                        f"({run.data.tags.get(FAILURE_REASON_TAG, 'no reason recorded')}); "
                        "start a new run instead")
    return run, has_checkpoint


# How the runs of one training are trained: given each epoch's callback (run index, metrics,
# state) and the compile fallback's, trains them all to the end.
Trainer = Callable[[Callable[[int, EpochMetrics, TrainState], None], Callable[[str], None]],
                   object]


def _train_in_runs(runs: list[RunRecord], data: MnistData, pipeline: Pipeline,
                   train: Trainer) -> list[RunResult]:
    """Train into `runs` (one, or stacked seeds) from their states to the end, checkpointing
    every epoch of each; end each run."""
    handlers = []
    for recording in runs:
        handler = logging.FileHandler(recording.tmp / TRAINING_LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        handlers.append(handler)
    log.setLevel(logging.INFO)  # training.log records every epoch, whatever the root level

    def on_compile_fallback(reason: str) -> None:
        for recording in runs:
            recording.run.set_tags({COMPILED_TAG: "false", COMPILE_FALLBACK_TAG: reason})

    first = runs[0]
    try:
        for recording in runs:
            recording.start(data)
        train(lambda index, metrics, state: runs[index].epoch(metrics, state),
              on_compile_fallback)
        # Training is done: finish with signals held, so that each run ends FINISHED with its
        # model, never half-logged or RUNNING; a signal meanwhile is reported after.
        with signals_deferred(deliver=False) as caught:
            for handler in handlers:
                handler.flush()
            for recording in runs:
                recording.finish(data, pipeline)
    except KeyboardInterrupt as err:
        name = str(err) or "SIGINT"
        # A second signal (Ctrl-C twice; under `mlflow run`, Ctrl-C reaches the entry point
        # and the runner's SIGTERM follows) must not cut the ending short.
        with signals_deferred(deliver=False):
            for recording in runs:
                reason = (f"interrupted ({name}) after epoch {recording.state.epoch} of "
                          f"{recording.config.epochs}")
                recording.stop(RunStatus.KILLED, reason,
                               f"Killed: {reason}; resume with `{recording.command}`.")
        raise RunInterrupted(name, first.run.run_id, first.state.epoch, first.config.epochs,
                             first.command, getattr(err, "exit_code", 130)) from err
    except BaseException as err:
        away = server_away(err)
        if away:
            raise _server_went_away(runs, away) from err
        full = disk_full(err)
        reason = (_disk_full_reason(full, first) if full is not None
                  else f"{type(err).__name__}: {err}")
        with signals_deferred(deliver=False):
            for recording in runs:
                recording.stop(RunStatus.FAILED, reason, f"Failed: {reason}")
        if full is None:
            raise
        ended = f"run {', '.join(r.run.run_id for r in runs)} ended FAILED"
        if not first.checkpointed:
            raise DiskFull(f"{reason}; {ended} before its first checkpoint; free space, then "
                           "start it again") from err
        raise DiskFull(
            f"{reason}; {ended}; its checkpoints up to epoch {first.checkpointed} of "
            f"{first.config.epochs} are intact; free space, then resume it with: "
            f"{first.command}") from err
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
    if caught:
        name = signal.Signals(caught[0]).name
        raise RunInterrupted(name, first.run.run_id, first.state.epoch, first.config.epochs,
                             "", 128 + caught[0], finished=True)
    return [RunResult(recording.run.run_id, recording.history) for recording in runs]


def _server_went_away(runs: list[RunRecord], error: str) -> ServerAway:
    """Tell the server, if it is back, that the runs stopped (KILLED: nothing failed in
    them); what to say."""
    first = runs[0]
    reason = server_away_reason(error)
    told = True
    with without_retries(), signals_deferred(deliver=False):
        for recording in runs:
            try:
                recording.stop(RunStatus.KILLED, reason, f"Killed: {reason}.")
            except Exception:  # still away: the run shows RUNNING until resumed
                told = False
    ids = ", ".join(r.run.run_id for r in runs)
    kept = (f"its checkpoints up to epoch {first.checkpointed} of {first.config.epochs} kept"
            if first.checkpointed else "it had no checkpoint yet (resume starts it over)")
    ended = (f"run {ids} ended KILLED, {kept}" if told else
             f"run {ids} could not be marked KILLED and shows RUNNING until resumed, {kept}")
    return ServerAway(f"{reason}; {ended}", first.command)


def _disk_full_reason(err: BaseException, recording: RunRecord) -> str:
    """What filled and where: the file when the error names it, else the run's artifacts."""
    if isinstance(err, OSError) and err.filename:
        where = f"{err.filename} (disk {mount_of(err.filename)})"
    elif isinstance(err, OSError) or recording.run.artifact_uri.startswith(("file:", "/")):
        location = recording.run.artifact_location()
        where = f"the run's artifacts in {location} (disk {mount_of(location)})"
    else:
        where = f"the tracking server's artifact store ({recording.run.artifact_uri})"
    return f"no space left on device writing {recording.writing} to {where}"
