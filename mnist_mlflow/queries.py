"""What a comparison reads from the tracking store: the FINISHED training runs, production's
group, per-epoch histories for the plots, and per-image records, computed from a run's
logged model when the run predates them.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient

from mnist_mlflow import store
from mnist_mlflow.config import TrainConfig, UserError
from mnist_mlflow.records import Records, RecordsError
from mnist_mlflow.schema import (
    BEST_TEST_ACC,
    BROKEN_TAG,
    FINAL_GAP,
    FINAL_TEST_ACC,
    METRICS,
    NUM_PARAMS,
    PREDICTIONS_DIR,
    RECORDED_METRICS,
    ROLE_TAG,
    TEST_ACC,
    TEST_LOSS,
    TRAIN_ACC,
    TRAIN_ROLE,
    VAL_ACC,
    VAL_SPLIT_DIGEST,
    records_artifact,
    settings_from_params,
    settings_of,
)
from mnist_mlflow.selection import Group, RunSummary, group_runs
from mnist_mlflow.store import experiment_id, store_error

log = logging.getLogger("mnist_mlflow")

# Every compared run needs these (validation ones where it has a split).
REQUIRED_METRICS = (TEST_ACC, TRAIN_ACC, FINAL_GAP, BEST_TEST_ACC)
PLOT_METRICS = (VAL_ACC, TEST_ACC, TEST_LOSS)
# Images scored per call when a logged model is asked for records.
SCORE_BATCH = 2000


def search_all(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    """Every active run of the experiment matching `query`, oldest first, page by page."""
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs([experiment_id], query, ViewType.ACTIVE_ONLY,
                                  SEARCH_MAX_RESULTS_THRESHOLD, ["attributes.start_time ASC"],
                                  page_token)
        runs += page
        page_token = page.token
        if not page_token:
            return runs


def summary_of(run: Run) -> RunSummary:
    metrics = dict(run.data.metrics)
    # Runs before final_test_acc existed: the latest test_acc is the last epoch's.
    metrics.setdefault(FINAL_TEST_ACC, metrics[TEST_ACC])
    config = TrainConfig(**settings_from_params(settings_of(run)))
    return RunSummary(run.info.run_id, run.info.run_name or run.info.run_id[:8],
                      run.info.start_time, run.info.status, int(run.data.params[NUM_PARAMS]),
                      dict(run.data.params), metrics, config,
                      run.data.params.get(VAL_SPLIT_DIGEST, ""))


def impossible(metric: str, value: float) -> str:
    """Why `value` cannot be `metric` ("" when it can): not a finite number, or an accuracy
    outside [0, 100]. SQL stores keep +inf as the largest double, which is finite; a run
    holding it would otherwise rank first."""
    if not math.isfinite(value):
        return "not a finite number"
    spec = METRICS.get(metric)
    if spec is not None and spec.kind == "accuracy" and not 0 <= value <= 100:
        return "not an accuracy in [0, 100]"
    return ""


def training_runs(runs: Iterable[Run], metric: str = "") -> tuple[list[RunSummary], list[str]]:
    """The training runs among `runs` with what a comparison reads, and skip warnings: a run
    that lacks a metric, or whose metric no run could have (not finite, an accuracy outside
    [0, 100]), is named and left out."""
    summaries, skipped = [], []
    for run in runs:
        if run.data.tags.get(ROLE_TAG, TRAIN_ROLE) != TRAIN_ROLE:
            continue  # sweep parents and earlier comparisons are not candidates
        metrics = run.data.metrics
        missing = [m for m in REQUIRED_METRICS if m not in metrics]
        missing += [] if run.data.params.get(NUM_PARAMS, "").isdigit() else [NUM_PARAMS]
        name = f"run {run.info.run_name} ({run.info.run_id})"
        if missing:
            skipped.append(f"skipping {name}: no {', '.join(missing)}")
            continue
        if BROKEN_TAG in run.data.tags:
            skipped.append(f"skipping {name}: tagged broken ({run.data.tags[BROKEN_TAG]}); "
                           "left out of every group")
            continue
        broken = [(m, why) for m in dict.fromkeys((*REQUIRED_METRICS, *RECORDED_METRICS, metric))
                  if m in metrics and (why := impossible(m, metrics[m]))]
        if broken:
            (found, why), = broken[:1]
            skipped.append(f"skipping {name}: {found} is {metrics[found]:g}, {why}; left out "
                           "of every group")
            continue
        summaries.append(summary_of(run))
    return summaries, skipped


def find_runs(experiment: str, filter_string: str, metric: str = ""
              ) -> tuple[list[RunSummary], list[str]]:
    """FINISHED training runs of `experiment` matching `filter_string`, and skip warnings."""
    client = store.client()
    found_id = experiment_id(experiment, client)
    query = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    try:
        runs = search_all(client, found_id, query)
    except MlflowException as err:
        raise UserError(f"invalid --filter {filter_string!r}: "
                        f"{err.message.splitlines()[0]}") from None
    return training_runs(runs, metric)


def group_of_run(run_id: str, metric: str) -> tuple[Group | None, str]:
    """The group of run `run_id` among the FINISHED training runs of its experiment, or None
    and a sentence saying why there is none (the run deleted, unfinished, without `metric`)."""
    client = store.client()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None, f"its run {run_id} is no longer in the tracking store"
    if run.info.lifecycle_stage != "active":
        return None, (f"its run {run.info.run_name} ({run_id}) was deleted; restore it with "
                      f"`mlflow runs restore --run-id {run_id}`")
    if run.info.status != "FINISHED":
        return None, f"its run {run.info.run_name} ({run_id}) is {run.info.status}"
    summaries, skipped = training_runs([run], metric)
    if not summaries:
        return None, f"its run {run.info.run_name} ({run_id}) cannot be compared: " + (
            skipped[0].split(": ", 1)[1] if skipped else "it is no training run")
    name = summaries[0].group
    peers, _ = training_runs(search_all(client, run.info.experiment_id,
                                        "attributes.status = 'FINISHED'"), metric)
    found = [g for g in group_runs(peers) if g.name == name]
    return (found[0], "") if found else (None, f"its run {run_id} has no group")


def mean_histories(groups: Sequence[Group]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per group label: metric -> [(epoch, mean over its seeds)] for the plotted metrics."""
    client = store.client()
    histories = {}
    for group in groups:
        curves: dict[str, list[tuple[int, float]]] = {}
        for metric in PLOT_METRICS:
            by_step: dict[int, list[float]] = {}
            for run in group.runs:
                for point in client.get_metric_history(run.run_id, metric):
                    by_step.setdefault(point.step, []).append(point.value)
            points = [(step, sum(v) / len(v)) for step, v in sorted(by_step.items())
                      if len(v) == group.n]
            if points:
                curves[metric] = points
        histories[group.label()] = curves
    return histories


def load_records(runs: Iterable[RunSummary], scored: Sequence[str]) -> list[RunSummary]:
    """Read each run's per-image records of the `scored` sets into `run.records`; the runs
    that lack some (made before records existed) are returned."""
    client = store.client()
    lacking = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            wanted = [name for name in scored if name not in run.records]
            if not wanted:
                continue
            present = {a.path for a in client.list_artifacts(run.run_id, PREDICTIONS_DIR)}
            for name in wanted:
                if records_artifact(name) not in present:
                    continue
                path = client.download_artifacts(run.run_id, records_artifact(name),
                                                 f"{tmp}/{run.run_id}")
                try:
                    run.records[name] = Records.read(path)
                except RecordsError as err:
                    log.warning("run %s: %s is unreadable (%s); judged without it", run.name,
                                records_artifact(name), err)
            if any(name not in run.records for name in scored):
                lacking.append(run)
    return lacking


def score_runs(runs: Sequence[RunSummary], scored: Sequence[str], data_dir: Path | str
               ) -> list[str]:
    """Per-image records for runs made before they existed, from each run's logged model on
    the MNIST files in `data_dir`; logged to the run (so this happens once) and kept in
    `run.records`. Returns a line for each run that could not be scored, saying why."""
    failed = []
    for run in runs:
        try:
            records = _score(run, scored, data_dir)
        except (UserError, MlflowException, OSError) as err:
            failed.append(f"{run.name} ({run.run_id}): {store_error(err)}")
            continue
        client = store.client()
        with tempfile.TemporaryDirectory() as tmp:
            for name, found in records.items():
                client.log_artifact(run.run_id, str(found.write(Path(tmp) / f"{name}.parquet")),
                                    PREDICTIONS_DIR)
                run.records[name] = found
    return failed


def _score(run: RunSummary, scored: Sequence[str], data_dir: Path | str) -> dict[str, Records]:
    # Loads torch (through the model and MNIST): only for runs made before records existed.
    from mnist_mlflow.predict import load_model
    from mnist_mlflow.registry import logged_model_uri

    uri = logged_model_uri(run.run_id)
    if uri is None:
        raise UserError("it logged no model")
    model = load_model(uri)
    data = _mnist(str(data_dir), run.config.train_limit, run.config.test_limit,
                  run.config.val_size)
    records = {}
    for name in scored:
        if name in run.records or (name == "validation" and not run.config.val_size):
            continue
        images, labels = data.val_tensors() if name == "validation" else data.test_tensors()
        index = data.val_indices if name == "validation" else np.arange(len(labels))
        pixels = (images.float() / 255).unsqueeze(1).numpy()
        scores = np.concatenate([np.asarray(model.predict(pixels[start:start + SCORE_BATCH]))
                                 for start in range(0, len(pixels), SCORE_BATCH)])
        predicted = scores.argmax(1)
        records[name] = Records(np.asarray(index, dtype=np.int64),
                                labels.numpy().astype(np.int64), predicted.astype(np.int64),
                                scores[np.arange(len(scores)), predicted].astype(np.float32))
    return records


@lru_cache(maxsize=4)
def _mnist(data_dir: str, train_limit: int, test_limit: int, val_size: int):  # noqa: ANN202
    from mnist_mlflow.data import load_mnist

    return load_mnist(data_dir, train_limit, test_limit, val_size)
