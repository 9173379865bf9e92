"""A sweep: one parent MLflow run, each variant trained as a nested child run.

A child is only "train this TrainConfig as a child of that parent run id", so children can
as well run in other processes or on other machines against the same tracking store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from mnist_mlflow.comparison import ROLE_TAG
from mnist_mlflow.config import RUNTIME_SETTINGS, TrainConfig, UserError
from mnist_mlflow.tracking import (
    DEFAULT_EXPERIMENT,
    RunInterrupted,
    check_tracking_store,
    config_from_params,
    log_new_params,
    resumable_run,
    resume_tracked,
    train_tracked,
)

log = logging.getLogger("mnist_mlflow")

SWEEP_ROLE = "sweep"
# On the parent and every child: the phase the sweep trained (empty for --variant sweeps).
PHASE_TAG = "mnist_mlflow.phase"
# On the parent: the command that started the sweep, quoted in RESULTS.md.
COMMAND_TAG = "mnist_mlflow.command"
# The parent's artifact listing every child's whole configuration, read by --resume.
PLAN_ARTIFACT = "sweep_plan.json"


@dataclass(frozen=True)
class ChildOutcome:
    """How one child ended; `error` is empty when it finished."""

    config: TrainConfig
    run_id: str
    status: str
    error: str = ""


@dataclass(frozen=True)
class SweepResult:
    parent_run_id: str
    children: list[ChildOutcome]

    @property
    def failed(self) -> list[ChildOutcome]:
        return [c for c in self.children if c.status != "FINISHED"]

    def count(self, status: str) -> int:
        return sum(1 for c in self.children if c.status == status)


def parse_variants(specs: Iterable[str]) -> list[tuple[str, float]]:
    """`["opt:0", "opt:0.05,wide:0.1"]` -> [("opt", 0.0), ("opt", 0.05), ("wide", 0.1)]."""
    variants = []
    for spec in (part.strip() for text in specs for part in text.split(",")):
        model, sep, dropout = spec.partition(":")
        try:
            variants.append((model.strip(), float(dropout)))
        except ValueError:
            raise UserError(f"invalid --variant {spec!r}: expected MODEL:DROPOUT, "
                            "for example opt:0.05") from None
        if not sep or not model.strip():
            raise UserError(f"invalid --variant {spec!r}: expected MODEL:DROPOUT")
    if len(set(variants)) != len(variants):
        raise UserError(f"invalid --variant: a variant is given twice in {list(specs)}")
    return variants


def sweep_configs(base: TrainConfig, variants: Sequence[tuple[str, float]]) -> list[TrainConfig]:
    """One validated config per variant, all other settings taken from `base`."""
    return [dataclasses.replace(base, model=model, dropout=dropout).validate()
            for model, dropout in variants]


def start_parent(experiment: str, configs: Sequence[TrainConfig], phase: str = "",
                 command: str = "") -> str:
    """Create the parent run (or adopt the one `mlflow run` made) and record what it sweeps:
    the settings all children share as params, and every child's config as the plan."""
    client = MlflowClient()
    # Under `mlflow run` the project runner created the run this process must report to.
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id is None:
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        run_id = client.create_run(experiment_id, run_name="sweep").info.run_id
    else:
        client.set_tag(run_id, MLFLOW_RUN_NAME, "sweep")
    settings = [c.as_params() for c in configs]
    shared = {k: v for k, v in settings[0].items() if all(s[k] == v for s in settings)}
    variants = dict.fromkeys(f"{c.model}:{c.dropout:g}" for c in configs)
    seeds = dict.fromkeys(str(c.seed) for c in configs)
    log_new_params(run_id, {**shared, "variants": ",".join(variants), "seeds": ",".join(seeds),
                            "phase": phase or "none", "children": len(configs)})
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / PLAN_ARTIFACT
        plan.write_text(json.dumps(settings, indent=1))
        client.log_artifact(run_id, str(plan))
    for key, value in {ROLE_TAG: SWEEP_ROLE, PHASE_TAG: phase, COMMAND_TAG: command}.items():
        client.set_tag(run_id, key, value)
    return run_id


def run_child(config: TrainConfig, data_dir: Path | str, parent_run_id: str,
              progress: bool = True, resume_run_id: str | None = None) -> ChildOutcome:
    """Train `config` as a child of `parent_run_id` (or go on with child `resume_run_id`);
    a failure is recorded, not raised. The child carries the parent's phase tag."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    experiment = client.get_experiment(experiment_id).name
    tags = {PHASE_TAG: parent.data.tags.get(PHASE_TAG, "")}
    earlier_children = _child_run_ids(client, experiment_id, parent_run_id)
    try:
        if resume_run_id:
            # How it runs comes from this sweep's command line, as for the new children.
            runtime = {name: getattr(config, name) for name in RUNTIME_SETTINGS}
            result = resume_tracked(resume_run_id, data_dir, runtime, progress=progress)
        else:
            result = train_tracked(config, data_dir, experiment, parent_run_id=parent_run_id,
                                   progress=progress, tags=tags)
    except Exception as err:  # one child's crash must not stop the others
        reason = f"{type(err).__name__}: {err}"
        log.error("child %s failed: %s", config.run_name, reason)
        # Training ends its run FAILED itself, unless it failed before starting one.
        started = _child_run_ids(client, experiment_id, parent_run_id) - earlier_children
        run_id = (resume_run_id or (started.pop() if started else
                  _record_failure(client, experiment_id, parent_run_id, config, reason, tags)))
        return ChildOutcome(config, run_id, "FAILED", reason)
    return ChildOutcome(config, result.run_id, "FINISHED")


def _child_run_ids(client: MlflowClient, experiment_id: str, parent_run_id: str) -> set[str]:
    runs = client.search_runs([experiment_id], f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_run_id}'",
                              max_results=SEARCH_MAX_RESULTS_THRESHOLD)
    return {run.info.run_id for run in runs}


def _record_failure(client: MlflowClient, experiment_id: str, parent_run_id: str,
                    config: TrainConfig, reason: str, tags: Mapping[str, str]) -> str:
    """A FAILED child run for a config that failed before training began its own run."""
    run = client.create_run(experiment_id, run_name=config.run_name,
                            tags={**tags, MLFLOW_PARENT_RUN_ID: parent_run_id,
                                  "failure_reason": reason})
    for key, value in config.as_params().items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    return run.info.run_id


def run_sweep(configs: Sequence[TrainConfig], data_dir: Path | str,
              experiment: str = DEFAULT_EXPERIMENT, progress: bool = True, phase: str = "",
              command: str = "") -> SweepResult:
    """Train every config as a child of one new parent; the parent ends FAILED if any did."""
    check_tracking_store()
    parent_run_id = start_parent(experiment, configs, phase, command)
    return _train_children(parent_run_id, [(c, None, None) for c in configs], data_dir,
                           progress)


def resume_sweep(parent_run_id: str, data_dir: Path | str,
                 given: Mapping[str, object] | None = None,
                 progress: bool = True) -> SweepResult:
    """Train, under the same parent, only the children of a sweep that did not finish.

    Children are matched to the sweep's variants by their whole configuration; a killed one
    goes on from its checkpoint, any other unfinished one is trained again as a new child.
    `given` may change how the children run (device, precision, compile, threads), nothing else.
    """
    check_tracking_store()
    client = MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException:
        raise UserError(f"no run {parent_run_id!r} in the tracking store "
                        f"{mlflow.get_tracking_uri()}") from None
    if parent.data.tags.get(ROLE_TAG) != SWEEP_ROLE:
        raise UserError(f"run {parent_run_id} is not a sweep's parent run")
    if parent.info.status == "FINISHED":
        raise UserError(f"sweep {parent_run_id} is FINISHED: every child finished")
    given = dict(given or {})
    overrides = {name: given.pop(name) for name in RUNTIME_SETTINGS if name in given}
    configs = [dataclasses.replace(
        config_from_params(parent_run_id, {k: str(v) for k, v in settings.items()}, given),
        **overrides) for settings in _plan(client, parent_run_id)]
    latest = _latest_children(client, parent)
    plan: list[tuple[TrainConfig, ChildOutcome | None, str | None]] = []
    for config in configs:
        child = latest.get(config.what_it_learns())
        if child is not None and child.info.status == "FINISHED":
            plan.append((config, ChildOutcome(config, child.info.run_id, "FINISHED"), None))
        else:
            plan.append((config, None, child and _resumable(client, child.info.run_id)))
    client.update_run(parent_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    return _train_children(parent_run_id, plan, data_dir, progress)


def _plan(client: MlflowClient, parent_run_id: str) -> list[dict[str, object]]:
    """The settings of every child, as the parent recorded them when the sweep started."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_run_id, PLAN_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise UserError(f"sweep {parent_run_id} has no {PLAN_ARTIFACT}: it cannot be "
                            "resumed; start the sweep again") from None
        return json.loads(Path(path).read_text())


def _latest_children(client: MlflowClient, parent: Run) -> dict[TrainConfig, Run]:
    """The most recent child run of each configuration under `parent` (keyed by what it
    learns: the device or threads it ran with do not make another child)."""
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent.info.run_id}'",
                              max_results=SEARCH_MAX_RESULTS_THRESHOLD,
                              order_by=["attributes.start_time ASC"])
    return {config_from_params(run.info.run_id, run.data.params, {}).what_it_learns(): run
            for run in runs}


def _resumable(client: MlflowClient, run_id: str) -> str | None:
    """`run_id` when it can go on from a checkpoint, else None (it is trained anew)."""
    try:
        return resumable_run(client, run_id).info.run_id
    except UserError:
        return None


def _train_children(parent_run_id: str,
                    plan: Sequence[tuple[TrainConfig, ChildOutcome | None, str | None]],
                    data_dir: Path | str, progress: bool) -> SweepResult:
    """Each (config, outcome if already finished, child to resume) in turn; end the parent."""
    client = MlflowClient()
    children: list[ChildOutcome] = []
    try:
        for config, finished, resume_run_id in plan:
            children.append(finished or run_child(config, data_dir, parent_run_id, progress,
                                                  resume_run_id))
    except RunInterrupted as err:
        children.append(ChildOutcome(config, err.run_id, "KILLED", str(err)))
        _end_parent(client, SweepResult(parent_run_id, children), RunStatus.KILLED)
        err.command = f"mnist-mlflow sweep --resume {parent_run_id}"
        raise
    except KeyboardInterrupt:
        _end_parent(client, SweepResult(parent_run_id, children), RunStatus.KILLED)
        raise
    result = SweepResult(parent_run_id, children)
    _end_parent(client, result, RunStatus.FAILED if result.failed else RunStatus.FINISHED)
    return result


def _end_parent(client: MlflowClient, result: SweepResult, status: int) -> None:
    """Record how many children finished, failed and were killed, and end the parent."""
    for name in ("finished", "failed", "killed"):
        client.set_tag(result.parent_run_id, f"children_{name}", str(result.count(name.upper())))
    client.set_terminated(result.parent_run_id, RunStatus.to_string(status))
