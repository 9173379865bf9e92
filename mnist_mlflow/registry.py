"""The model registry: register a chosen run's model, move aliases `production`/`previous`.

Aliases, not the deprecated stages. `production` only ever points at a version whose run
FINISHED; the version that loses it gets `previous`, so a rollback is one `promote`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import mlflow
from mlflow.entities import LoggedModelStatus, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_mlflow import store
from mnist_mlflow.config import UserError
from mnist_mlflow.schema import (
    BROKEN_TAG,
    BROKEN_VERSION_TAG,
    DEFAULT_MODEL_NAME,
    LOOKS_TAG,
    REPRODUCED_AT_TAG,
    REPRODUCED_VERSION_TAG,
    SEEN_TAG,
    VERSION_GROUP_INTERVAL_TAG,
    VERSION_GROUP_MEAN_TAG,
    VERSION_VERDICT_TAG,
)
from mnist_mlflow.stats import Looks
from mnist_mlflow.store import open_store, store_error

PRODUCTION = "production"
PREVIOUS = "previous"


@dataclass(frozen=True)
class Promotion:
    """What happened to the `production` alias and why."""

    version: str
    moved: bool
    message: str


@dataclass(frozen=True)
class VersionRow:
    version: str
    aliases: list[str]
    metric: str
    judged: str  # the group mean and interval promotion judged, and the verdict
    reproduced: str  # what `reproduce` found, and when
    run_name: str
    run_id: str
    created: str
    broken: str = ""  # what is broken about it (version_broken), "" when nothing


# A version tag holds what the SQL stores allow; past it, older fingerprints are dropped, so
# that their groups count as new evidence again: stricter, never looser.
SEEN_LIMIT = 5000


def check_model_name(model_name: str) -> str:
    """`model_name` if it can name a registered model; UserError otherwise.

    Names go into MLflow's filter strings and `models:/` URIs: quotes would break the one,
    slashes and colons the other.
    """
    if not model_name.strip():
        raise UserError("invalid --model-name: the name is empty")
    bad = sorted({c for c in model_name if c in "'\"/:%\\"})
    if bad:
        raise UserError(f"invalid --model-name {model_name!r}: it may not contain "
                        f"{' '.join(bad)}")
    return model_name


def check_loads(model_uri: str) -> None:
    """UserError unless the model at `model_uri` loads and answers: 10 finite probabilities
    per image for two blank images (what any request to it would need)."""
    import numpy as np

    from mnist_mlflow.predict import load_model

    model = load_model(model_uri)
    try:
        scores = np.asarray(model.predict(np.zeros((2, 1, 28, 28), dtype=np.float32)))
    except Exception as err:  # whatever a broken model raises
        raise UserError(f"model {model_uri} loads but cannot predict: "
                        f"{store_error(err)}") from None
    if scores.shape != (2, 10) or not np.isfinite(scores).all():
        raise UserError(f"model {model_uri} answers {scores.shape} scores, not 10 finite "
                        "probabilities per image")


def production_version(model_name: str, client: MlflowClient | None = None
                       ) -> ModelVersion | None:
    """The version holding `production`; None when the model or the alias does not exist."""
    client = client or store.client()
    try:
        return client.get_model_version_by_alias(model_name, PRODUCTION)
    except MlflowException as err:
        # No registered model yet, or no version holds the alias.
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _finished_run(client: MlflowClient, run_id: str) -> Run:
    """The run behind a version; UserError when it is gone or did not finish."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"run {run_id} no longer exists in the tracking store") from None
    if run.info.status != "FINISHED" or run.info.lifecycle_stage != "active":
        raise UserError(f"run {run.info.run_name} ({run_id}) is {run.info.status}"
                        f"{' and deleted' if run.info.lifecycle_stage != 'active' else ''}; "
                        f"only a FINISHED run may be {PRODUCTION}")
    return run


def _metric(run: Run, metric: str) -> float:
    if metric not in run.data.metrics:
        raise UserError(f"run {run.info.run_name} ({run.info.run_id}) has no metric {metric!r}")
    return run.data.metrics[metric]


def logged_model_uri(run_id: str, experiment_id: str | None = None) -> str | None:
    """`models:/<id>` of the model run `run_id` logged, once complete (READY); None if it has
    none. A run logs one model, named for its variant (`model` in runs made before)."""
    if experiment_id is None:
        experiment_id = store.client().get_run(run_id).info.experiment_id
    logged = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in logged if m.status == LoggedModelStatus.READY]
    return f"models:/{ready[0].model_id}" if ready else None


def version_broken(version: ModelVersion, client: MlflowClient | None = None) -> str:
    """What is broken about a registered version ("" when nothing): tagged broken by
    `doctor --repair`, or its model files gone."""
    if BROKEN_VERSION_TAG in version.tags:
        return f"tagged broken ({version.tags[BROKEN_VERSION_TAG]})"
    if store.model_files_gone(version.source or "", client):
        return f"its model files are gone ({version.source})"
    return ""


def check_registrable(run_id: str, model_name: str, metric: str) -> str:
    """The `models:/<id>` of run `run_id`'s logged model; UserError unless the run could be
    registered: FINISHED, with `metric`, not tagged broken, and a complete logged model
    (checked before a comparison records anything; whether it loads is check_loads')."""
    check_model_name(model_name)
    client = store.client()
    run = _finished_run(client, run_id)
    _metric(run, metric)
    if BROKEN_TAG in run.data.tags:
        raise UserError(f"run {run.info.run_name} ({run_id}): tagged broken: "
                        f"{run.data.tags[BROKEN_TAG]}")
    uri = logged_model_uri(run_id, run.info.experiment_id)
    if uri is None:
        raise UserError(f"run {run.info.run_name} ({run_id}) has no logged model to register")
    return uri


def registrable(candidates: Sequence[tuple[str, str]], model_name: str, metric: str
                ) -> tuple[str | None, dict[str, str]]:
    """Of `candidates` (run id, run name), best first, the first whose model can be
    registered (FINISHED with `metric`, a logged model that loads and answers), and for each
    one passed over (by run id) a line: what is wrong and what to do. A run whose model files
    are gone (deleted by hand, by a cleanup job, by an artifact store's expiry rule) is one of
    those; its metrics still count, it just cannot be production."""
    check_model_name(model_name)
    passed_over = {}
    for run_id, name in candidates:
        try:
            check_loads(check_registrable(run_id, model_name, metric))
        except UserError as err:
            why = str(err).removeprefix(f"run {name} ({run_id})").lstrip(": ")
            # Its metrics still count; a reproduction is no training run, so the way out
            # is a new training run of its configuration, or the run deleted.
            passed_over[run_id] = (f"run {name} ({run_id}) cannot be registered: {why}. Its "
                                   "metrics still count: train its configuration again, or "
                                   "leave it out with `mnist-mlflow doctor --repair` (tags "
                                   "it broken, deletes nothing)")
            continue
        return run_id, passed_over
    return None, passed_over


def register_run(run_id: str, model_name: str, metric: str, description: str,
                 tags: Mapping[str, str] | None = None) -> ModelVersion:
    """The run's model as a version of `model_name`; the existing version if already there.

    The model must load and predict first, so that no version is made of one that cannot.
    """
    check_model_name(model_name)
    open_store()
    client = store.client()
    run = _finished_run(client, run_id)
    value, run_name = _metric(run, metric), run.info.run_name
    tags = {"selection_metric": metric, metric: f"{value}", "run_name": run_name,
            **(tags or {})}
    existing = [v for v in _versions(client, model_name) if v.run_id == run_id]
    if existing:
        version = existing[0]
        for key, tag in tags.items():
            client.set_model_version_tag(model_name, version.version, key, tag)
    else:
        # Looked up first so that a run without a model leaves the registry untouched.
        uri = logged_model_uri(run_id, run.info.experiment_id)
        if uri is None:
            raise UserError(f"run {run_name} ({run_id}) has no logged model to register")
        check_loads(uri)
        version = mlflow.register_model(uri, model_name, tags=tags)
        _describe_model(client, model_name)
    client.update_model_version(model_name, version.version, description)
    return client.get_model_version(model_name, version.version)


def _describe_model(client: MlflowClient, model_name: str) -> None:
    """Say what the registered model holds, once (a description set by hand stays)."""
    if client.get_registered_model(model_name).description:
        return
    client.update_registered_model(model_name, (
        "Compact MNIST CNNs chosen by `mnist-mlflow compare`. Input: float32 images "
        "(N, 1, 28, 28), pixels in [0, 1], white digit on black; output: 10 class "
        f"probabilities. Alias `{PRODUCTION}` is the model in use, `{PREVIOUS}` the one "
        "before it (rollback: `mnist-mlflow promote --version N`). Each version's "
        "description says why it was chosen."))


def promote(model_name: str, version: str) -> Promotion:
    """Point `production` at `version` unconditionally (rollback), if its run FINISHED."""
    check_model_name(model_name)
    open_store()
    client = store.client()
    try:
        target = client.get_model_version(model_name, version)
    except MlflowException:
        raise UserError(f"registered model {model_name!r} has no version {version!r}; "
                        "see `mnist-mlflow models`") from None
    _finished_run(client, target.run_id)
    broken = version_broken(target, client)
    if broken:
        raise UserError(f"version {version} of {model_name!r} cannot be {PRODUCTION}: {broken}")
    current = production_version(model_name, client)
    if current is not None and str(current.version) == str(target.version):
        return Promotion(target.version, False, f"version {version} is already {PRODUCTION}")
    return _move(client, model_name, target.version, current, "asked for with --version")


def move_production(model_name: str, version: str, why: str) -> Promotion:
    """Point `production` at `version` for the reason `why` (judged by the caller)."""
    client = store.client()
    current = production_version(model_name, client)
    if current is not None and str(current.version) == str(version):
        return Promotion(version, False, f"version {version} is already {PRODUCTION}")
    return _move(client, model_name, version, current, why)


def describe_version(model_name: str, version: str, text: str,
                     tags: Mapping[str, str] | None = None) -> None:
    """Set a version's description (the registry's page shows it) and tags."""
    client = store.client()
    client.update_model_version(model_name, version, text)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(model_name, version, key, value)


def looks_of(version: ModelVersion) -> Looks:
    """The looks at challengers recorded on a production version (none yet: Looks())."""
    count = version.tags.get(LOOKS_TAG, "0")
    seen = version.tags.get(SEEN_TAG, "")
    return Looks(int(count) if count.isdigit() else 0,
                 frozenset(filter(None, seen.split(","))))


def record_looks(model_name: str, version: str, looks: Looks) -> None:
    """Keep on the production version how many looks its challengers have had, and which."""
    seen = ",".join(sorted(looks.seen))
    if len(seen) > SEEN_LIMIT:
        seen = seen[-SEEN_LIMIT:].split(",", 1)[-1]
    describe_tags = {LOOKS_TAG: str(looks.count), SEEN_TAG: seen}
    client = store.client()
    for key, value in describe_tags.items():
        client.set_model_version_tag(model_name, version, key, value)


def _move(client: MlflowClient, model_name: str, version: str, current: ModelVersion | None,
          why: str) -> Promotion:
    """Set `production` on `version`, if its run FINISHED and its model loads and predicts;
    the version that held it becomes `previous`."""
    _finished_run(client, client.get_model_version(model_name, version).run_id)
    check_loads(f"models:/{model_name}/{version}")
    client.set_registered_model_alias(model_name, PRODUCTION, version)
    if current is not None:
        client.set_registered_model_alias(model_name, PREVIOUS, current.version)
    held = f"; version {current.version} is now {PREVIOUS}" if current is not None else ""
    return Promotion(version, True, f"{PRODUCTION} -> version {version} ({why}){held}")


def _versions(client: MlflowClient, model_name: str) -> list[ModelVersion]:
    versions = client.search_model_versions(f"name = '{model_name}'")
    return sorted(versions, key=lambda v: int(v.version))


def list_versions(model_name: str = DEFAULT_MODEL_NAME) -> list[VersionRow]:
    """Every version of `model_name` with its aliases, selection metric and source run."""
    check_model_name(model_name)
    open_store(writes=False)
    client = store.client()
    versions = _versions(client, model_name)
    if not versions:
        raise UserError(f"no registered model {model_name!r} with versions; "
                        "run `mnist-mlflow compare` first")
    # Searched versions come without their aliases; the registered model has them all.
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(model_name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in versions:
        metric = v.tags.get("selection_metric", "")
        judged = v.tags.get(VERSION_GROUP_INTERVAL_TAG) or v.tags.get(VERSION_GROUP_MEAN_TAG, "")
        if judged and VERSION_VERDICT_TAG in v.tags:
            judged += f"; {v.tags[VERSION_VERDICT_TAG]}"
        rows.append(VersionRow(str(v.version), sorted(aliases.get(str(v.version), [])),
                               f"{metric} {v.tags.get(metric, '?')}" if metric else "",
                               judged, " ".join(filter(None, [
                                   v.tags.get(REPRODUCED_VERSION_TAG, ""),
                                   f"({v.tags[REPRODUCED_AT_TAG]})"
                                   if REPRODUCED_AT_TAG in v.tags else ""])),
                               v.tags.get("run_name", ""), v.run_id or "",
                               datetime.fromtimestamp(v.creation_timestamp / 1000)
                               .strftime("%Y-%m-%d %H:%M"), version_broken(v, client)))
    return rows
