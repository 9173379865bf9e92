"""`mnist-mlflow doctor`: which runs and registered versions of a store are still whole, and
the safe repairs.

A store breaks in ways no command sees at once: a process dies and leaves its run RUNNING,
a cleanup job or an artifact store's expiry rule removes a run's model or records, a version's
source run is deleted. Each check below reads only what the store lists (no model is loaded,
no training is run), so a store of a thousand runs is checked in seconds. The repairs change
nothing that was measured and delete nothing: a stale run is ended KILLED (so that `--resume`
goes on with it), missing per-image records are scored again from the run's own model, and
what cannot be mended is tagged (BROKEN_TAG) with what is wrong, so that every command
leaves it out and says why.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import LoggedModelStatus, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from mnist_mlflow import store
from mnist_mlflow.mlrun import STALE_AFTER_S, lease_of, mark_killed
from mnist_mlflow.queries import load_records, score_runs, search_all, summary_of
from mnist_mlflow.records import Records, RecordsError
from mnist_mlflow.registry import PRODUCTION, version_broken
from mnist_mlflow.report import markdown_table
from mnist_mlflow.schema import (
    BROKEN_TAG,
    BROKEN_VERSION_TAG,
    CHECKPOINT_DIR,
    CODE_DIRTY_TAG,
    COMPARISON_ROLE,
    FAILURE_REASON_TAG,
    LEGACY_CHECKPOINT,
    MNIST_MD5_TAG_PREFIX,
    PATCH_ARTIFACT,
    PREDICTIONS_DIR,
    RECORD_TAGS,
    RECORDED_METRICS,
    ROLE_TAG,
    TRAIN_ROLE,
    checkpoint_artifact,
    records_artifact,
)
from mnist_mlflow.store import experiment_id, listed, model_files_gone_at

REPAIRED_BY = "mnist-mlflow doctor --repair"
# Records and the metric they score agree to the digits the metric is logged at.
AGREE_WITHIN = 0.005 + 1e-9


@dataclass
class Problem:
    """One thing broken: where, what, and what `--repair` does about it (or what to do)."""

    experiment: str
    subject: str  # `run NAME (ID)` or `mnist-cnn version 3`
    problem: str
    repair: str
    fix: Callable[[], str] | None = None  # the safe repair; returns the line that says it


@dataclass
class Checkup:
    """What a check found: the problems, and what earlier repairs already tagged broken."""

    problems: list[Problem] = field(default_factory=list)
    tagged: list[Problem] = field(default_factory=list)
    runs: int = 0
    versions: int = 0
    unreproducible: int = 0  # runs made before runs recorded what `reproduce` needs

    @property
    def whole(self) -> bool:
        return not self.problems


def run_label(run: Run) -> str:
    return f"run {run.info.run_name} ({run.info.run_id})"


def examine(experiment: str = "", data_dir: Path | str = "data") -> Checkup:
    """Check every experiment's runs and every registered version (with `experiment`: that
    experiment's runs, and the versions registered from them)."""
    client = store.client()
    if experiment:
        names = {experiment_id(experiment, client): experiment}
    else:
        names = {e.experiment_id: e.name for e in client.search_experiments()}
    checkup = Checkup()
    for found_id, name in names.items():
        runs = search_all(client, found_id, "")
        checkup.runs += len(runs)
        models = _models_by_run(client, found_id)
        for run in runs:
            _check_run(client, checkup, name, run, models.get(run.info.run_id, []), data_dir)
    _check_versions(client, checkup, set(names) if experiment else None)
    return checkup


def describe(checkup: Checkup) -> str:
    """What a check found: a line, one table of the problems, and what is already known."""
    lines = [f"checked {checkup.runs} runs and {checkup.versions} registered versions: "
             + (f"{len(checkup.problems)} problem{'s' * (len(checkup.problems) != 1)}"
                if checkup.problems
                else "the store is whole")]
    if checkup.problems:
        lines.append(markdown_table([["Experiment", "Run or version", "Problem", "Repair"]] + [
            [p.experiment, p.subject, p.problem, p.repair] for p in checkup.problems]))
    if checkup.tagged:
        lines.append(f"{len(checkup.tagged)} tagged broken by an earlier repair, left out by "
                     "every command: " + "; ".join(f"{p.subject}: {p.problem}"
                                                   for p in checkup.tagged))
    if checkup.unreproducible:
        lines.append(f"{checkup.unreproducible} runs were made before runs recorded what "
                     "`reproduce` needs: it refuses them, saying what is missing")
    return "\n".join(lines)


def repair(checkup: Checkup) -> list[str]:
    """Make each safe repair; a line for each saying what was done."""
    done = []
    for problem in checkup.problems:
        if problem.fix is not None:
            try:
                done.append(f"{problem.subject}: {problem.fix()}")
            except (MlflowException, OSError) as err:
                done.append(f"{problem.subject}: could not repair ({store.store_error(err)})")
    return done


def _models_by_run(client: MlflowClient, found_id: str) -> dict[str, list]:
    found: dict[str, list] = {}
    token = None
    while True:
        page = client.search_logged_models([found_id], max_results=1000, page_token=token)
        for model in page:
            found.setdefault(model.source_run_id, []).append(model)
        token = page.token
        if not token:
            return found


def _tag_broken(client: MlflowClient, run_id: str, why: str) -> Callable[[], str]:
    def fix() -> str:
        client.set_tag(run_id, BROKEN_TAG, why)
        return f"tagged broken ({why}): every command leaves it out"
    return fix


def _check_run(client: MlflowClient, checkup: Checkup, experiment: str, run: Run,
               models: list, data_dir: Path | str) -> None:
    tags, info = run.data.tags, run.info
    subject = run_label(run)

    def problem(what: str, repair_text: str, fix: Callable[[], str] | None) -> None:
        checkup.problems.append(Problem(experiment, subject, what, repair_text, fix))

    if BROKEN_TAG in tags:
        checkup.tagged.append(Problem(experiment, subject, tags[BROKEN_TAG],
                                      "left out by every command; remove the tag once whole"))
        return
    if info.status == "RUNNING":
        lease = lease_of(run)
        if lease is not None and not lease.alive:
            why = f"process gone ({lease.describe()})"
        elif lease is None and time.time() - info.start_time / 1000 > STALE_AFTER_S:
            # Every trainer of this package holds a lease from its first second; a run
            # RUNNING this long without one has nobody training it.
            why = f"RUNNING for {(time.time() - info.start_time / 1000) / 3600:.1f} h with no lease"
        else:
            return
        def end_killed() -> str:
            mark_killed(run, why, REPAIRED_BY)
            return f"marked KILLED; resume it with `mnist-mlflow train --resume {info.run_id}`"

        problem(f"RUNNING, but {why}", "end it KILLED; `train --resume` goes on with it",
                end_killed)
        return
    role = tags.get(ROLE_TAG, TRAIN_ROLE)
    if role == COMPARISON_ROLE and info.status == "FAILED":
        why = f"a comparison that FAILED: {tags.get(FAILURE_REASON_TAG, 'no reason recorded')}"
        problem(why, "tag it broken (it chose nothing)", _tag_broken(client, info.run_id, why))
        return
    if role != TRAIN_ROLE or info.status != "FINISHED":
        return
    gone, records = _missing(run, models)
    if records and not gone:
        problem("; ".join(records), f"score its model again on the MNIST files in {data_dir}",
                lambda: _rescore(client, run, data_dir))
    elif gone or records:
        why = "; ".join([*gone, *records])
        problem(why, "tag it broken: every command leaves it out, saying so",
                _tag_broken(client, info.run_id, why))
    if not all(key in tags for key in RECORD_TAGS) or not any(
            key.startswith(MNIST_MD5_TAG_PREFIX) for key in tags):
        checkup.unreproducible += 1


def _missing(run: Run, models: list) -> tuple[list[str], list[str]]:
    """What a FINISHED training run lacks or gets wrong, one phrase each: what no repair can
    bring back, and its per-image records that are gone or unreadable (which its model can
    score again)."""
    gone, records = [], []
    location = run.info.artifact_uri
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    if not ready:
        gone.append("no complete logged model")
    elif model_files_gone_at(ready[0].artifact_location):
        gone.append(f"model files gone (models:/{ready[0].model_id})")
    params, metrics = run.data.params, run.data.metrics
    epochs = params.get("epochs", "")
    checkpoints = listed(location, CHECKPOINT_DIR)
    if epochs.isdigit() and checkpoint_artifact(int(epochs)) not in checkpoints \
            and LEGACY_CHECKPOINT not in checkpoints:
        gone.append(f"checkpoint of epoch {epochs} gone")
    if run.data.tags.get(CODE_DIRTY_TAG) == "true" and PATCH_ARTIFACT not in listed(
            location, PATCH_ARTIFACT.rsplit("/", 1)[0]):
        gone.append(f"{PATCH_ARTIFACT} gone (`reproduce --at-commit` needs it)")
    present = listed(location, PREDICTIONS_DIR)
    for metric, scored in RECORDED_METRICS.items():
        if metric not in metrics:
            continue  # a run without a validation split has no validation records
        artifact = records_artifact(scored)
        if artifact not in present:
            records.append(f"{scored} records gone")
            continue
        found = _read(location, artifact)
        if isinstance(found, str):
            records.append(f"{scored} records unreadable ({found})")
        elif abs(found.accuracy - metrics[metric]) > AGREE_WITHIN:
            # Not repaired by scoring again: which of the two is wrong is unknown.
            gone.append(f"{scored} records say {found.accuracy:.2f}%, {metric} "
                        f"{metrics[metric]:.2f}")
    return gone, records


def _read(location: str, artifact: str) -> Records | str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Records.read(get_artifact_repository(location).download_artifacts(
                artifact, tmp))
        except (RecordsError, MlflowException, OSError) as err:
            return store.store_error(err)


def _rescore(client: MlflowClient, run: Run, data_dir: Path | str) -> str:
    summary = summary_of(run)
    scored = [s for m, s in RECORDED_METRICS.items() if m in run.data.metrics]
    load_records([summary], scored)  # those that read; the rest are scored again
    failed = score_runs([summary], scored, data_dir)
    if failed:
        why = f"its records cannot be scored again: {failed[0].split(': ', 1)[1]}"
        _tag_broken(client, run.info.run_id, why)()
        return f"tagged broken ({why})"
    return f"records of {', '.join(scored)} scored again from its model"


def _check_versions(client: MlflowClient, checkup: Checkup, experiments: set[str] | None
                    ) -> None:
    for model in _registered(client):
        versions = client.search_model_versions(f"name = '{model.name}'")
        aliases: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        healthy = []
        broken = []
        for version in sorted(versions, key=lambda v: int(v.version)):
            run_experiment, why = _version_source(client, version)
            if experiments is not None and run_experiment not in experiments:
                continue
            checkup.versions += 1
            held = aliases.get(str(version.version), [])
            subject = (f"{model.name} version {version.version}"
                       + (f" (@{', @'.join(held)})" if held else ""))
            if BROKEN_VERSION_TAG in version.tags:
                checkup.tagged.append(Problem(run_experiment or "?", subject,
                                              version.tags[BROKEN_VERSION_TAG],
                                              "`promote` refuses it"))
                broken.append(version)
            elif why:
                checkup.problems.append(Problem(
                    run_experiment or "?", subject, why, "tag it broken: `promote` refuses it",
                    _tag_version(client, model.name, str(version.version), why)))
                broken.append(version)
            else:
                healthy.append(version)
        # What is served is production: it stays on a broken version until a healthy
        # winner replaces it (the registry's rule), so it stays a problem until then. Other
        # aliases (`previous`) are named with their version.
        for version in broken:
            if PRODUCTION not in aliases.get(str(version.version), []):
                continue
            way_out = (f"roll back: `mnist-mlflow promote --model-name {model.name} "
                       f"--version {healthy[-1].version}`" if healthy else
                       "register a healthy run: `mnist-mlflow compare`")
            checkup.problems.append(Problem(
                "", f"{model.name}@{PRODUCTION}",
                f"points at version {version.version}, which is broken: models:/"
                f"{model.name}@{PRODUCTION} cannot be served",
                f"none (kept until a healthy winner replaces it); {way_out}"))


def _registered(client: MlflowClient) -> Iterable:
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _version_source(client: MlflowClient, version: ModelVersion) -> tuple[str, str]:
    """(the experiment id of the version's source run, "" when gone; what is broken, "")."""
    try:
        run = client.get_run(version.run_id)
    except MlflowException:
        return "", f"its source run {version.run_id} is no longer in the tracking store"
    if run.info.lifecycle_stage != "active":
        return run.info.experiment_id, (
            f"its source {run_label(run)} was deleted; restore it with "
            f"`mlflow runs restore --run-id {version.run_id}`")
    return run.info.experiment_id, version_broken(version, client)


def _tag_version(client: MlflowClient, name: str, version: str, why: str
                 ) -> Callable[[], str]:
    def fix() -> str:
        client.set_model_version_tag(name, version, BROKEN_VERSION_TAG, why)
        return f"tagged broken ({why}): `promote` refuses it"
    return fix
