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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import mlflow
from filelock import FileLock, Timeout
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

from mnist_mlflow.config import DISK_FULL_ERRNOS, UserError
from mnist_mlflow.schema import (
    DESCRIPTION_TAG,
    FAILURE_REASON_TAG,
    LEASE_TAG,
    OLD_LEASE_TAGS,
    SHARED_VIEW_TAG_PREFIX,
    THUMBS_DIR,
    param_text,
)

log = logging.getLogger("mnist_mlflow")

# An HTTP tracking server that does not accept a connection within this is reported as down.
STORE_CONNECT_TIMEOUT_S = 5.0
# How long a process waits for another one to finish creating or migrating a SQLite store.
STORE_LOCK_TIMEOUT_S = 120.0
# A RUNNING run whose process is on another host counts as gone after this long without a
# heartbeat (one comes at the start and after every epoch; an epoch takes seconds to minutes).
STALE_AFTER_S = 30 * 60
# MLflow's limits: 100 params and 1000 metrics per log_batch call; 8000 characters per tag.
PARAMS_PER_BATCH = 100
TAG_LIMIT = 8000
CUT_NOTE = ("\n\n*(Cut here: a run's description holds 8,000 characters. The whole text is "
            "among the run's artifacts.)*\n")


# A dataset insert that lost a race with another run's (see MlflowRun.log_inputs) is tried
# again this many times; PostgreSQL says "duplicate key", SQLite "UNIQUE constraint failed".
DATASET_RACE_RETRIES = 3
_UNIQUE_VIOLATION = re.compile(r"duplicate key value|UNIQUE constraint failed|UniqueViolation",
                               re.IGNORECASE)


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


def _lost_insert_race(err: MlflowException) -> bool:
    return bool(_UNIQUE_VIOLATION.search(str(err)))


# SQLite stores this process has made ready: a command opens its store once, however many
# functions on its way ask for it (train, then register, say).
_READY_STORES: set[tuple[str, bool]] = set()  # (uri, ready for writes)


def absolute_uri(uri: str) -> str:
    """`uri` with a relative SQLite path made absolute, for a process started in another
    folder (a Ray worker, the recorded code's worktree)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


class ServerPatience(logging.Filter):
    """A tracking server that does not answer, said once.

    MLflow's HTTP client tries a request that finds no server again and again (up to
    MLFLOW_HTTP_REQUEST_MAX_RETRIES times, waiting longer each time), and urllib3 logs each
    try, a long line each. The first becomes one line that says what happens and for how
    long; the others are dropped; the next heartbeat that goes through says it is back.
    """

    def __init__(self) -> None:
        super().__init__()
        self.away_since: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Retrying ("):
            return True
        self.away(_connection_error(message))
        return False

    def away(self, reason: str) -> None:
        """Say, once until it answers again, that the server does not answer and why."""
        if self.away_since is None:
            self.away_since = time.monotonic()
            log.warning("tracking server %s does not answer (%s); trying again for up to %s",
                        mlflow.get_tracking_uri(), reason, retry_window())

    def answered(self) -> None:
        if self.away_since is not None:
            log.warning("tracking server %s answers again after %.0f s; going on",
                        mlflow.get_tracking_uri(), time.monotonic() - self.away_since)
            self.away_since = None


SERVER_PATIENCE = ServerPatience()
# What MLflow's error says when its retries found no server.
SERVER_AWAY_TEXT = ("Max retries exceeded", "Failed to establish a new connection",
                    "Connection refused", "RemoteDisconnected", "Connection aborted")


# How urllib3 and requests say what broke a connection, and how we say it.
CONNECTION_BREAKS = (("RemoteDisconnected", "the server closed the connection"),
                     ("Read timed out", "no answer in time"),
                     ("Connection aborted", "connection aborted"))


def _connection_error(text: str) -> str:
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if found:
        return found.group(1).strip()
    return next((said for phrase, said in CONNECTION_BREAKS if phrase in text), "no connection")


def _retry_settings() -> tuple[int, int]:
    """MLflow's MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR now."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    return MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()


# The environment that sets MLflow's patience with a tracking server: a process that trains
# for a sweep elsewhere (a Ray worker) takes the driver's.
RETRY_SETTINGS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def retry_seconds() -> float:
    """How long MLflow's retries of one request last, as urllib3 waits between them: none
    before the second try, then backoff_factor * 2**(n-1), at most 120 s."""
    retries, factor = _retry_settings()
    return sum(min(factor * 2 ** (n - 1), 120) for n in range(2, retries + 1))


def retry_window() -> str:
    """`retry_seconds`, and the settings it comes from."""
    retries, factor = _retry_settings()
    return (f"about {retry_seconds():.0f} s (MLFLOW_HTTP_REQUEST_MAX_RETRIES={retries}, "
            f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR={factor})")


def _in_chain(err: BaseException, says: Callable[[BaseException], bool]) -> BaseException | None:
    """The first error in `err`'s chain (its causes and contexts) of which `says` is true."""
    seen: set[int] = set()
    found: BaseException | None = err
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        if says(found):
            return found
        found = found.__cause__ or found.__context__
    return None


def server_away(err: BaseException) -> str:
    """What the connection error in `err`'s chain says when MLflow found no tracking server
    (after its retries); empty for any other error."""
    found = _in_chain(err, lambda e: isinstance(e, MlflowException)
                      and any(t in str(e) for t in SERVER_AWAY_TEXT))
    return _connection_error(str(found)) if found is not None else ""


def server_away_reason(error: str) -> str:
    """What to say once MLflow's retries ran out: which server, its error, how long it was
    tried."""
    return (f"the tracking server {mlflow.get_tracking_uri()} did not answer ({error}) "
            f"through MLflow's retries, {retry_window()}")


@contextlib.contextmanager
def without_retries() -> Iterator[None]:
    """MLflow's requests tried once, 10 s at most: for a last word to a server that was away
    (minutes of retries already)."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                                     "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def open_store(writes: bool = True, patient: bool = False) -> str:
    """Make the tracking store ready before anything is loaded or created; its URI.

    An HTTP server that does not answer is a UserError at once (not minutes of retries). A
    SQLite store is created and migrated by the first process that opens it; several opening
    a new one at once race (`table experiments already exists`, an alembic temp table left
    behind for good), so creation and migration happen under a file lock beside the
    database: the first process creates, the others wait, then find it ready. A store that
    cannot be opened (damaged, read-only, not a database) is one line naming it; so is a
    read-only one, for a command that `writes` (MLflow would fail at its first write, after
    two tracebacks of its own).
    """
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        retries = logging.getLogger("urllib3.connectionpool")
        if SERVER_PATIENCE not in retries.filters:
            retries.addFilter(SERVER_PATIENCE)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        # `patient`: a sweep's child, whose sweep reached the server: one restarting is
        # waited for as MLflow's retries would wait (said once), not a failed child.
        deadline = time.monotonic() + (retry_seconds() if patient else 0)
        while True:
            try:
                socket.create_connection((parsed.hostname, port),
                                         timeout=STORE_CONNECT_TIMEOUT_S).close()
                SERVER_PATIENCE.answered()
                break
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise UserError(f"tracking store {uri} cannot be reached "
                                    f"({err.strerror or err}); start the server or set "
                                    "MLFLOW_TRACKING_URI") from None
                SERVER_PATIENCE.away(str(err.strerror or err))
                time.sleep(2)
        return uri
    if parsed.scheme != "sqlite":
        return uri
    path = Path(unquote(uri.removeprefix("sqlite:///")))
    if not path.parent.is_dir():
        raise UserError(f"tracking store {uri}: folder {path.parent} does not exist")
    # SQLite writes the database and a journal beside it. access() answers for root too:
    # an immutable file or folder (chattr +i, as a backup tool leaves it) is not writable.
    # Checked each time: a store may turn read-only while a process uses it.
    unwritable = [p for p in (path, path.parent) if p.exists() and not os.access(p, os.W_OK)]
    if writes and unwritable:
        raise UserError(f"tracking store {uri} is read-only: {unwritable[0]} cannot be written "
                        "(attempt to write a readonly database); this command records to it: "
                        "make it writable, or set MLFLOW_TRACKING_URI to another store")
    if (uri, True) in _READY_STORES or (uri, writes) in _READY_STORES:
        return uri
    # Reading a read-only store that exists: nothing to create, and no lock file to make.
    lock = (contextlib.nullcontext() if unwritable and path.exists()
            else FileLock(f"{path}.lock", timeout=STORE_LOCK_TIMEOUT_S))
    try:
        with lock, _quiet(STORE_LOGGERS):
            client = MlflowClient()
            client.search_experiments(max_results=1)  # creates and migrates the tables
            client.search_registered_models(max_results=1)
    except Timeout:
        raise UserError(f"tracking store {uri}: another process has held {path}.lock for "
                        f"{STORE_LOCK_TIMEOUT_S:.0f} s; remove it if no mnist-mlflow or "
                        "mlflow command is running") from None
    except OSError as err:  # the lock file cannot be made: a read-only folder
        raise UserError(f"tracking store {uri} cannot be opened: {err.strerror or err} "
                        f"({err.filename or path.parent})") from None
    except Exception as err:  # SQLAlchemy and MLflow say it in many ways
        raise UserError(f"tracking store {uri} cannot be opened: "
                        f"{store_error(err)}") from None
    _READY_STORES.add((uri, writes))
    return uri


# They narrate creating a store ("Creating initial MLflow database tables...", each alembic
# migration): a dozen lines before the command's own output on first use.
STORE_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# What a refused endpoint of the tracking server would have done, for permission errors.
ACTIONS = {"runs/create": "create runs in this experiment",
           "model-versions/create": "register versions of this model",
           "registered-models/create": "create registered models",
           "registered-models/alias": "move this model's aliases",
           "experiments/create": "create experiments"}


def store_error(err: BaseException) -> str:
    """The first line of what the store said, without SQLAlchemy's background links; for a
    server that refuses the credentials or the permission, what to do about it."""
    text = str(getattr(err, "message", None) or err).strip()
    code = getattr(err, "error_code", "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if "error code 401" in text or code == "UNAUTHENTICATED":
        if not user:
            return ("the server needs credentials: set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD")
        return (f"the server refused the credentials of user {user!r}: check "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if "error code 403" in text or code == "PERMISSION_DENIED":
        endpoint = re.search(r"/api/2\.0/mlflow/(\S+?) failed", text)
        action = ACTIONS.get(endpoint.group(1), endpoint.group(1)) if endpoint else "do this"
        return (f"permission denied: user {user!r} may not {action}; ask the server's admin "
                "for EDIT (or MANAGE) on it")
    lines = text.splitlines()
    return (lines[0] if lines else type(err).__name__)[:300]


# What a full disk or quota says through a server's error answer.
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def disk_full(err: BaseException) -> BaseException | None:
    """The error in `err`'s chain that says a disk (or quota) is full, if one does: an
    OSError here, or the server's answer about its own disk."""
    return _in_chain(err, lambda e: (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)
                     or (isinstance(e, MlflowException)
                         and any(t in str(e) for t in DISK_FULL_TEXT)))


def experiment_id(name: str, client: MlflowClient | None = None, create: bool = False,
                  tags: Mapping[str, str] | None = None) -> str:
    """The id of experiment `name`, created when `create` (else UserError when the store has
    none). `tags` (its description, saved views) are set where the experiment lacks them, so
    a user's edits stay; `{experiment_id}` in a value stands for its id."""
    client = client or MlflowClient()
    if not name.strip():
        raise UserError("invalid --experiment: the name is empty")
    found = client.get_experiment_by_name(name)
    if found is None and not create:
        raise UserError(f"no experiment named {name!r} in {mlflow.get_tracking_uri()}")
    if found is not None:
        new_id, existing = found.experiment_id, found.tags
    else:
        try:
            new_id, existing = client.create_experiment(name), {}
        except MlflowException:  # created meanwhile by another process
            found = client.get_experiment_by_name(name)
            new_id, existing = found.experiment_id, found.tags
    tag_experiment(client, new_id, tags or {}, existing)
    return new_id


def tag_experiment(client: MlflowClient, experiment_id: str, tags: Mapping[str, str],
                   existing: Mapping[str, str]) -> None:
    """Set the `tags` an experiment lacks (`existing`: those it has); `{experiment_id}` in a
    value stands for its id."""
    for key, value in tags.items():
        if key not in existing:
            try:
                client.set_experiment_tag(experiment_id, key,
                                          value.replace("{experiment_id}", experiment_id))
            except MlflowException as err:  # another process set it meanwhile: theirs stays
                if not _lost_insert_race(err):
                    raise


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
    """`name`, or `name #2`, `#3`...: the first no other run of the experiment has, so that
    two runs of one configuration and seed (a rerun, a 2-epoch check) are told apart."""
    taken = {run.info.run_name for run in client.search_runs(
        [experiment_id], f"attributes.run_name LIKE '{name.replace(chr(39), '_')}%'",
        ViewType.ALL, SEARCH_MAX_RESULTS_THRESHOLD) if run.info.run_id != own_id}
    if name not in taken:
        return name
    return next(f"{name} #{k}" for k in range(2, len(taken) + 3) if f"{name} #{k}" not in taken)


class MlflowRun:
    """A run id and the client that writes to it."""

    def __init__(self, run_id: str, client: MlflowClient | None = None) -> None:
        self.client = client or MlflowClient()
        self.run_id = run_id
        self._pending: list[Any] = []  # asynchronous metric batches not yet confirmed

    @classmethod
    def create(cls, experiment: str, run_name: str, parent_run_id: str | None = None,
               tags: Mapping[str, str] | None = None, description: str = "",
               experiment_tags: Mapping[str, str] | None = None) -> MlflowRun:
        """A new RUNNING run in `experiment` (created if need be, with `experiment_tags` where
        it lacks them), with MLflow's context tags."""
        client = MlflowClient()
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
                if attempt == DATASET_RACE_RETRIES or not _lost_insert_race(err):
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


def running_runs(client: MlflowClient | None = None) -> list[tuple[Run, Lease | None]]:
    """Every RUNNING run of every experiment, with its lease."""
    client = client or MlflowClient()
    found = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    if experiments:
        for run in client.search_runs(experiments, "attributes.status = 'RUNNING'",
                                      max_results=SEARCH_MAX_RESULTS_THRESHOLD):
            found.append((run, lease_of(run)))
    return found


def mark_killed(run: Run, lease: Lease) -> None:
    """End a RUNNING run whose process is gone KILLED, saying so; --resume goes on with it."""
    MlflowRun(run.info.run_id).end(
        RunStatus.KILLED, f"process gone ({lease.describe()}); marked KILLED by "
                          "mnist-mlflow runs --stale --mark-killed")
