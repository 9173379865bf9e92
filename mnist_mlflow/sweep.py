"""A sweep: one parent MLflow run, each variant trained as a nested child run.

A child is only "train this TrainConfig as a child of that parent run id", so children can
as well run in other processes or on other machines against the same tracking store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from mnist_mlflow.comparison import ROLE_TAG
from mnist_mlflow.config import TrainConfig, UserError
from mnist_mlflow.tracking import DEFAULT_EXPERIMENT, check_tracking_store, train_tracked

log = logging.getLogger("mnist_mlflow")

# The seed's two runs: Opt-1 (no dropout) and Opt-2 (dropout 0.05).
DEFAULT_VARIANTS: tuple[tuple[str, float], ...] = (("opt", 0.0), ("opt", 0.05))
SWEEP_ROLE = "sweep"


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


def start_parent(experiment: str, configs: Sequence[TrainConfig]) -> str:
    """Create the parent run (or adopt the one `mlflow run` made) and record what it sweeps."""
    client = MlflowClient()
    # Under `mlflow run` the project runner created the run this process must report to.
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id is None:
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        run_id = client.create_run(experiment_id, run_name="sweep").info.run_id
    else:
        client.set_tag(run_id, MLFLOW_RUN_NAME, "sweep")
    base = {k: v for k, v in configs[0].as_params().items() if k not in ("model", "dropout")}
    params = {**base, "variants": ",".join(f"{c.model}:{c.dropout:g}" for c in configs)}
    # `mlflow run` has already logged its -P values; MLflow forbids changing a param.
    existing = client.get_run(run_id).data.params
    for key, value in params.items():
        if key not in existing:
            client.log_param(run_id, key, value)
    client.set_tag(run_id, ROLE_TAG, SWEEP_ROLE)
    return run_id


def run_child(config: TrainConfig, data_dir: Path | str, parent_run_id: str,
              progress: bool = True) -> ChildOutcome:
    """Train `config` as a child of `parent_run_id`; a failure is recorded, not raised."""
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    experiment = client.get_experiment(experiment_id).name
    earlier_children = _child_run_ids(client, experiment_id, parent_run_id)
    try:
        result = train_tracked(config, data_dir, experiment, parent_run_id=parent_run_id,
                               progress=progress)
    except Exception as err:  # one child's crash must not stop the others
        reason = f"{type(err).__name__}: {err}"
        log.error("child %s failed: %s", config.run_name, reason)
        # Training ends its run FAILED itself, unless it failed before starting one.
        started = _child_run_ids(client, experiment_id, parent_run_id) - earlier_children
        run_id = (started.pop() if started else
                  _record_failure(client, experiment_id, parent_run_id, config, reason))
        return ChildOutcome(config, run_id, "FAILED", reason)
    return ChildOutcome(config, result.run_id, "FINISHED")


def _child_run_ids(client: MlflowClient, experiment_id: str, parent_run_id: str) -> set[str]:
    runs = client.search_runs([experiment_id], f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_run_id}'",
                              max_results=SEARCH_MAX_RESULTS_THRESHOLD)
    return {run.info.run_id for run in runs}


def _record_failure(client: MlflowClient, experiment_id: str, parent_run_id: str,
                    config: TrainConfig, reason: str) -> str:
    """A FAILED child run for a config that failed before training began its own run."""
    run = client.create_run(experiment_id, run_name=config.run_name,
                            tags={MLFLOW_PARENT_RUN_ID: parent_run_id, "failure_reason": reason})
    for key, value in config.as_params().items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    return run.info.run_id


def run_sweep(configs: Sequence[TrainConfig], data_dir: Path | str,
              experiment: str = DEFAULT_EXPERIMENT, progress: bool = True) -> SweepResult:
    """Train every config as a child of one new parent; the parent ends FAILED if any did."""
    check_tracking_store()
    parent_run_id = start_parent(experiment, configs)
    client = MlflowClient()
    children: list[ChildOutcome] = []
    try:
        for config in configs:
            children.append(run_child(config, data_dir, parent_run_id, progress))
    except KeyboardInterrupt:
        client.set_terminated(parent_run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    result = SweepResult(parent_run_id, children)
    client.set_tag(parent_run_id, "children_finished", str(len(children) - len(result.failed)))
    client.set_tag(parent_run_id, "children_failed", str(len(result.failed)))
    status = RunStatus.FAILED if result.failed else RunStatus.FINISHED
    client.set_terminated(parent_run_id, RunStatus.to_string(status))
    return result
