"""The tracking store: the one place that builds an `MlflowClient`, makes the store ready
(a SQLite store created and migrated under a file lock; a server that does not answer said in
one line) and turns what the store says into one line a user can act on.

Every other module asks `client()` for its client, so how the store is reached (retries,
credentials, the lock) is decided here once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_mlflow.config import DISK_FULL_ERRNOS, UserError

log = logging.getLogger("mnist_mlflow")


def client() -> MlflowClient:
    """A client of the current tracking store (MLFLOW_TRACKING_URI, or this folder's)."""
    return MlflowClient()


# An HTTP tracking server that does not accept a connection within this is reported as down.
STORE_CONNECT_TIMEOUT_S = 5.0
# How long a process waits for another one to finish creating or migrating a SQLite store.
STORE_LOCK_TIMEOUT_S = 120.0
# An insert that lost a race with another process's: PostgreSQL says "duplicate key",
# SQLite "UNIQUE constraint failed".
_UNIQUE_VIOLATION = re.compile(r"duplicate key value|UNIQUE constraint failed|UniqueViolation",
                               re.IGNORECASE)


def lost_insert_race(err: MlflowException) -> bool:
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
            if not path.exists() and not unwritable:
                _create_whole(path)
            _wait_migrated(path)
            _ready(MlflowClient())
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


# A logged model is whole when MLflow can read what it is: its MLmodel file.
MODEL_FILE = "MLmodel"


def listed(location: str, path: str = "") -> set[str]:
    """The paths under `path` of the artifacts at `location` (a run's artifact URI, a logged
    model's artifact location); none when it cannot be listed. Read from the artifact store
    straight: listing through a run reads the run from the tracking store each time."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        return {f.path for f in get_artifact_repository(location).list_artifacts(path or None)}
    except (MlflowException, OSError):
        return set()


def model_files_gone_at(location: str) -> bool:
    """Whether the logged model at artifact `location` has lost its files (deleted by hand,
    by a cleanup job, by an artifact store's expiry rule): no MLmodel file is listed."""
    return MODEL_FILE not in listed(location)


def model_files_gone(model_uri: str, tracking: MlflowClient | None = None) -> bool:
    """`model_files_gone_at` for `models:/<logged model id>`; False for any other URI (a
    registered model's name or alias, `runs:/`, a path), whose files MLflow resolves."""
    if not model_uri.startswith("models:/"):
        return False
    try:
        model = (tracking or client()).get_logged_model(model_uri.removeprefix("models:/"))
    except MlflowException:
        return False
    return model_files_gone_at(model.artifact_location)


def _create_whole(path: Path) -> None:
    """Create and migrate a new SQLite store beside `path`, then put it in place at once.

    The lock above keeps our own processes apart, but not `mlflow ui` or `mlflow server`
    started on the same file meanwhile: MLflow migrates a store it finds without tables, and
    two processes migrating one file fail (`table latest_metrics already exists`). Built
    under another name and linked into place (which fails if the name exists), the store
    appears whole or not at all; if another process made one first, that one is used."""
    building = path.with_name(f".{path.name}.creating-{os.getpid()}")
    building.unlink(missing_ok=True)
    try:
        _ready(MlflowClient(f"sqlite:///{building}"))
        try:
            os.link(building, path)
        except FileExistsError:
            pass  # made meanwhile by another process (mlflow ui): waited for, then used
    finally:
        building.unlink(missing_ok=True)


# A store whose schema has not changed for this long is not being migrated by anyone.
MIGRATION_QUIET_S = 5.0


def _wait_migrated(path: Path) -> None:
    """Wait while another process (mlflow ui, mlflow server) creates or migrates the store:
    opening it meanwhile would run the same migrations on the same file, and both fail
    (`table ... already exists`, or alembic's temporary table left behind for good). Reads
    the schema version with sqlite3 alone, which migrates nothing. Returns once it is
    MLflow's latest, or has not changed for MIGRATION_QUIET_S (an old store: MLflow then
    says it needs `mlflow db upgrade`), or at STORE_LOCK_TIMEOUT_S."""
    from mlflow.store.db.utils import _get_latest_schema_revision  # MLflow's own head

    head = _get_latest_schema_revision()
    deadline = time.monotonic() + STORE_LOCK_TIMEOUT_S
    seen, quiet_since = None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                    timeout=1)) as database:
                found = database.execute("SELECT version_num FROM alembic_version").fetchone()
            state = found[0] if found else None
        except sqlite3.Error as err:  # no tables yet, locked while written, not a database
            state = str(err)
            if "file is not a database" in state:
                return  # damaged: opening it says so, in one line
        if state == head:
            return
        now = time.monotonic()
        if state != seen:
            seen, quiet_since = state, now
        elif now - quiet_since > MIGRATION_QUIET_S:
            return
        time.sleep(0.2)


def _ready(client: MlflowClient) -> None:
    """The store's tables, created or migrated if need be. A store that another process
    (mlflow ui) is migrating right now fails for a moment: waited for, not reported."""
    deadline = time.monotonic() + STORE_LOCK_TIMEOUT_S
    while True:
        try:
            client.search_experiments(max_results=1)  # creates and migrates the tables
            client.search_registered_models(max_results=1)
            return
        except Exception as err:  # SQLAlchemy's OperationalError, among others
            said = store_error(err)
            if not any(sign in said for sign in MIGRATING) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# What opening a store says while another process is creating or migrating its tables.
MIGRATING = ("already exists", "migration", "alembic", "database is locked", "no such table")


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
                if not lost_insert_race(err):
                    raise
