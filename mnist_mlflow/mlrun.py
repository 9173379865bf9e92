"""One MLflow run's lifecycle: create it (or adopt one `mlflow run` made), log to it, end it.

Everything the project writes to a run goes through `MlflowRun`, by the client API with the
run id it holds: no process-global active run, so a sweep's children (in this process or in
other ones) each log to the run they were given. Runs it creates carry the context tags that
fluent `mlflow.start_run` would set (source, git commit, user).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import re
import socket
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import mlflow
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag, ViewType
from mlflow.entities.dataset_input import DatasetInput
from mlflow.entities.input_tag import InputTag
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient
from mlflow.tracking.context import registry as context_registry
from mlflow.utils.git_utils import get_git_commit
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
)
from mlflow.utils.time import get_current_time_millis

from mnist_mlflow import store
from mnist_mlflow.schema import (
    DESCRIPTION_TAG,
    FAILURE_REASON_TAG,
    LEASE_TAG,
    OLD_LEASE_TAGS,
    SHARED_VIEW_TAG_PREFIX,
    THUMBS_DIR,
    param_text,
)
from mnist_mlflow.store import (
    SERVER_PATIENCE,
    experiment_id,
    lost_insert_race,
    tag_experiment,
)

log = logging.getLogger("mnist_mlflow")

# A RUNNING run whose process is on another host counts as gone after this long without a
# heartbeat (one comes at the start and after every epoch; an epoch takes seconds to minutes).
STALE_AFTER_S = 30 * 60
# MLflow's limits: 100 params and 1000 metrics per log_batch call; 8000 characters per tag.
PARAMS_PER_BATCH = 100
TAG_LIMIT = 8000
CUT_NOTE = ("\n\n*(Cut here: a run's description holds 8,000 characters. The whole text is "
            "among the run's artifacts.)*\n")


# A dataset insert that lost a race with another run's (see MlflowRun.log_inputs) is tried
# again this many times.
DATASET_RACE_RETRIES = 3


def fit_tag(value: str, key: str = "") -> str:
    """`value` cut to what a tag holds. PostgreSQL and MySQL stores refuse a longer one (a
    comparison over 2,000 groups made a 384 KB description), SQLite keeps it. A description
    is cut at a line, with a note saying where the rest is."""
    if len(value) <= TAG_LIMIT:
        return value
    if key != DESCRIPTION_TAG:
        return value[:TAG_LIMIT]
    end = value.rfind("\n", 0, TAG_LIMIT - len(CUT_NOTE))
    return value[:end if end > 0 else TAG_LIMIT - len(CUT_NOTE)] + CUT_NOTE


# The UI's saved views ("Views", top right of an experiment's runs) are experiment tags:
# this prefix and an id, the value a name and the page's state, deflated JSON in base64.
SAVED_VIEW_PREFIX = SHARED_VIEW_TAG_PREFIX
# The state the UI 3.17 saves for its default runs page; a view changes what it needs.
_VIEW_DEFAULTS = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
                  "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
                  "modelVersionFilter": "All Runs", "selectedColumns": [], "columnOrder": [],
                  "columnWidths": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False,
                  "runListHidden": False, "isAccordionReordered": False,
                  "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
                  "groupsExpanded": {}, "globalLineChartConfig": {
                      "xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}


def saved_view(view_id: str, name: str, **state: object) -> dict[str, str]:
    """The experiment tag of a saved view `name` showing the runs page with `state`."""
    packed = base64.b64encode(zlib.compress(json.dumps(_VIEW_DEFAULTS | state).encode()))
    now = get_current_time_millis()
    return {SAVED_VIEW_PREFIX + view_id: json.dumps(
        {"name": name, "createdAt": now, "updatedAt": now,
         "state": "deflate;" + packed.decode()})}


def artifact_link(run_id: str) -> Callable[[str], str]:
    """A file among run `run_id`'s artifacts, as the tracking server serves it: the link a
    description needs for MLflow's UI to show a figure (its renderer allows images and links,
    relative to the UI's address)."""
    return lambda name: f"get-artifact?path={quote(name)}&run_uuid={run_id}"


def inline_figure(run_id: str) -> Callable[[str, str], str]:
    """Markdown for figure `path` among run `run_id`'s artifacts: its small copy (THUMBS_DIR
    beside it), linked to the full figure."""
    link = artifact_link(run_id)

    def figure(alt: str, path: str) -> str:
        folder, _, name = path.rpartition("/")
        small = f"{folder}/{THUMBS_DIR}/{name}" if folder else f"{THUMBS_DIR}/{name}"
        return f"[![{alt}]({link(small)})]({link(path)})"
    return figure


def lease_tags(pid: int | None = None) -> dict[str, str]:
    """This process (or `pid` on this host) as the holder of a run, alive now."""
    return {LEASE_TAG: f"pid {pid or os.getpid()} on {socket.gethostname()}, "
                       f"heartbeat {time.time():.0f}"}


def context_tags() -> dict[str, str]:
    """MLflow's context tags (user, source, ...) and the git commit of this code.

    MLflow takes the commit from the entry script, which for `mnist-mlflow` is a script in
    the (git-ignored) virtual environment: it would record none. The package's own folder
    says which code ran.
    """
    tags = context_registry.resolve_tags()
    if MLFLOW_GIT_COMMIT not in tags:
        commit = get_git_commit(str(Path(__file__).resolve().parent))
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def unique_name(client: MlflowClient, experiment_id: str, name: str, own_id: str = "") -> str:
    """`name`, or `name` numbered `#2`, `#3`...: the first no other run of the experiment has,
    so that two runs of one configuration and seed (a rerun, a 2-epoch check) are told apart.
    The number goes after the seed (`s1 #2 opt e2`), not at the end: the UI's runs table cuts
    names at about 20 characters, which would hide it."""
    head, _, tail = name.partition(" ")

    def numbered(k: int) -> str:
        return f"{head} #{k} {tail}" if tail else f"{name} #{k}"

    pattern = (f"{head} %{tail}" if tail else f"{name}%").replace(chr(39), "_")
    taken = {run.info.run_name for run in client.search_runs(
        [experiment_id], f"attributes.run_name LIKE '{pattern}'", ViewType.ALL,
        SEARCH_MAX_RESULTS_THRESHOLD) if run.info.run_id != own_id}
    if name not in taken:
        return name
    return next(numbered(k) for k in range(2, len(taken) + 3) if numbered(k) not in taken)


class MlflowRun:
    """A run id and the client that writes to it."""

    def __init__(self, run_id: str, client: MlflowClient | None = None) -> None:
        self.client = client or store.client()
        self.run_id = run_id
        self._pending: list[Any] = []  # asynchronous metric batches not yet confirmed

    @classmethod
    def create(cls, experiment: str, run_name: str, parent_run_id: str | None = None,
               tags: Mapping[str, str] | None = None, description: str = "",
               experiment_tags: Mapping[str, str] | None = None) -> MlflowRun:
        """A new RUNNING run in `experiment` (created if need be, with `experiment_tags` where
        it lacks them), with MLflow's context tags."""
        client = store.client()
        exp_id = experiment_id(experiment, client, create=True, tags=experiment_tags)
        # The lease from the first moment: a process killed at any point after this leaves
        # a run that `runs --stale` finds.
        run_tags = {**context_tags(), **lease_tags(), **(tags or {})}
        if parent_run_id:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if description:
            run_tags[DESCRIPTION_TAG] = description
        run = client.create_run(exp_id, run_name=unique_name(client, exp_id, run_name),
                                tags={k: fit_tag(str(v), k) for k, v in run_tags.items()})
        return cls(run.info.run_id, client)

    @classmethod
    def adopt(cls, run_id: str, run_name: str, tags: Mapping[str, str] | None = None) -> MlflowRun:
        """The run `mlflow run` created for this process, renamed and tagged as ours."""
        run = cls(run_id)
        name = unique_name(run.client, run.experiment_id, run_name, run_id)
        run.set_tags({MLFLOW_RUN_NAME: name, **lease_tags(), **(tags or {})})
        return run

    @classmethod
    def create_or_adopt(cls, runner_run_id: str | None, experiment: str, run_name: str,
                        **kwargs: Any) -> MlflowRun:
        """Adopt the run `mlflow run` made when there is one, else create one."""
        if runner_run_id:
            description = kwargs.get("description")
            tags = {**(kwargs.get("tags") or {}),
                    **({DESCRIPTION_TAG: description} if description else {})}
            run = cls.adopt(runner_run_id, run_name, tags)
            if kwargs.get("experiment_tags"):  # `mlflow run` made the experiment: tag it too
                exp_id = run.experiment_id
                tag_experiment(run.client, exp_id, kwargs["experiment_tags"],
                               run.client.get_experiment(exp_id).tags)
            return run
        return cls.create(experiment, run_name, **kwargs)

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    @property
    def name(self) -> str:
        """The run's name as the store has it (`s1 #2 ...` for a second run of one name)."""
        return self.client.get_run(self.run_id).info.run_name or ""

    def reopen(self) -> None:
        """Mark a stopped run RUNNING again, to go on with it."""
        self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def hold_lease(self) -> None:
        """Record that this process trains the run (host, pid) and that it is alive now."""
        self.set_tags(lease_tags())

    def heartbeat(self) -> None:
        self.set_tags(lease_tags())
        SERVER_PATIENCE.answered()

    def log_new_params(self, params: Mapping[str, object]) -> None:
        """Log the params the run does not have yet.

        `mlflow run` has already logged the -P values as given (say "0.050"); MLflow forbids
        changing a param, so only the ones it did not log are added.
        """
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, param_text(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start:start + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int, synchronous: bool = True,
                    model_id: str | None = None,
                    datasets: Mapping[str, tuple[str, str]] | None = None) -> None:
        """All of `metrics` at `step` as one batch; asynchronous ones are awaited by flush.
        With `model_id` they are the logged model's metrics too, and `datasets` says what
        each was measured on (metric -> dataset name, digest): the model's page lists those
        as its "Datasets used"."""
        now = get_current_time_millis()
        on = datasets or {}
        batch = [Metric(k, float(v), now, step, model_id=model_id,
                        dataset_name=on.get(k, (None, None))[0],
                        dataset_digest=on.get(k, (None, None))[1]) for k, v in metrics.items()]
        operation = self.client.log_batch(self.run_id, metrics=batch, synchronous=synchronous)
        if not synchronous and operation is not None:
            self._pending.append(operation)

    def flush(self) -> None:
        """Wait until every asynchronous batch is in the store."""
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, fit_tag(str(v), k))
                                                 for k, v in tags.items()])

    def delete_tag(self, key: str) -> None:
        self.client.delete_tag(self.run_id, key)

    def describe(self, text: str) -> None:
        """The run's description, shown on its page in the UI."""
        self.set_tags({DESCRIPTION_TAG: text})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @functools.cached_property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def artifact_location(self) -> str:
        """Where the run's artifacts are written: a local folder, or the server's URI."""
        uri = self.artifact_uri
        return unquote(urlparse(uri).path) if uri.startswith(("file:", "/")) else uri

    def discard_artifact(self, artifact: str) -> None:
        """Remove `artifact` if it is there: what a write cut short left. Best effort (the
        store may be what failed): the caller is already reporting that failure."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        with contextlib.suppress(Exception):
            get_artifact_repository(self.artifact_uri).delete_artifacts(artifact)

    def log_inputs(self, datasets: Mapping[str, mlflow.data.dataset.Dataset]) -> None:
        """Datasets used by the run, by context (`train`, `test`): the UI's Dataset column.

        MLflow's store looks for the experiment's existing dataset rows, then inserts the
        missing ones in the same transaction; two runs logging a new dataset at the same
        moment (a sweep's children on Ray) both insert it and the second fails on the unique
        key. Its transaction is rolled back whole, so trying again finds the row and links it.
        """
        inputs = [DatasetInput(dataset._to_mlflow_entity(),
                               [InputTag(MLFLOW_DATASET_CONTEXT, context)])
                  for context, dataset in datasets.items()]
        for attempt in range(DATASET_RACE_RETRIES + 1):
            try:
                self.client.log_inputs(self.run_id, inputs)
                return
            except MlflowException as err:
                if attempt == DATASET_RACE_RETRIES or not lost_insert_race(err):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_pytorch_model(self, model: Any, name: str, step: int, description: str = "",
                          **kwargs: Any) -> str:
        """`mlflow.pytorch.log_model` into this run, as made at `step`; its id. The run's
        params and its metrics at `step` go with it (MLflow copies them), and `description` is
        what its page in the UI says.

        The logged model is created here, in the run's experiment: left to itself, MLflow
        would put it in the process's current experiment, which without a fluent run is
        `Default`.
        """
        run = self.client.get_run(self.run_id)
        tags = {**context_tags(), **({DESCRIPTION_TAG: fit_tag(description, DESCRIPTION_TAG)}
                                     if description else {})}
        logged = self.client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=self.run_id,
            params=dict(run.data.params), tags=tags)
        mlflow.pytorch.log_model(model, name=name, model_id=logged.model_id, run_id=self.run_id,
                                 step=step, **kwargs)
        return logged.model_id

    def logged_models(self) -> list[Any]:
        """The models logged from this run (MLflow's LoggedModel), any status."""
        return mlflow.search_logged_models(
            experiment_ids=[self.experiment_id], output_format="list",
            filter_string=f"source_run_id = '{self.run_id}'")

    def end(self, status: int, reason: str = "") -> None:
        """End the run with `status`, recording why it did not finish; metrics stay."""
        try:
            self.flush()
        finally:
            if reason:
                self.set_tags({FAILURE_REASON_TAG: reason[:5000]})
            self.client.set_terminated(self.run_id, RunStatus.to_string(status))
            # Only a RUNNING run's lease means anything: ended, it is bookkeeping the UI
            # would list among the tags people read. (After the status: a run never looks
            # RUNNING without its holder.)
            with contextlib.suppress(MlflowException):
                self.client.delete_tag(self.run_id, LEASE_TAG)


@dataclass(frozen=True)
class Lease:
    """Who holds a RUNNING run, and whether that process is still there."""

    host: str
    pid: int
    heartbeat: float
    alive: bool

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"pid {self.pid} on {self.host}, last heartbeat {age:.0f} s ago"


_LEASE = re.compile(r"pid (\d+) on (.*), heartbeat (\d+(?:\.\d*)?)")


def lease_of(run: Run) -> Lease | None:
    """The lease of a RUNNING run (None for other runs, and runs made before leases).

    On this host a lease is alive while its pid is; elsewhere while its heartbeat is younger
    than STALE_AFTER_S.
    """
    tags = run.data.tags
    if run.info.status != "RUNNING":
        return None
    found = _LEASE.fullmatch(tags.get(LEASE_TAG, ""))
    if found:
        pid, host, heartbeat = int(found[1]), found[2], float(found[3])
    elif OLD_LEASE_TAGS[1] in tags:
        pid, host = int(tags[OLD_LEASE_TAGS[1]]), tags.get(OLD_LEASE_TAGS[0], "")
        heartbeat = float(tags.get(OLD_LEASE_TAGS[2], "0"))
    else:
        return None
    if host == socket.gethostname():
        alive = _pid_alive(pid)
    else:
        alive = time.time() - heartbeat < STALE_AFTER_S
    return Lease(host, pid, heartbeat, alive)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: there all the same
        return True
    return True


def running_runs(client: MlflowClient | None = None
                 ) -> list[tuple[Run, str, Lease | None]]:
    """Every RUNNING run of every experiment, with its experiment's name and its lease."""
    client = client or store.client()
    found = []
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    if names:
        for run in client.search_runs(list(names), "attributes.status = 'RUNNING'",
                                      max_results=SEARCH_MAX_RESULTS_THRESHOLD):
            found.append((run, names.get(run.info.experiment_id, run.info.experiment_id),
                          lease_of(run)))
    return found


def mark_killed(run: Run, why: str, by: str = "mnist-mlflow runs --stale --mark-killed"
                ) -> None:
    """End a RUNNING run whose process is gone KILLED, saying so; --resume goes on with it."""
    MlflowRun(run.info.run_id).end(RunStatus.KILLED, f"{why}; marked KILLED by {by}")
