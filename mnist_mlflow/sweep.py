"""A sweep: one parent MLflow run, each variant trained as a nested child run.

The parent creates each child's run before it trains (SCHEDULED, with its params), so its id
is known; a child is then a job, "train this config into that run" (or "resume that run"),
handed to an executor. `LocalExecutor` runs the jobs one after another in this process; an
executor that runs them elsewhere (other processes, other machines, the same tracking store)
only has to return each job's outcome, which is also in the store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnist_mlflow import store
from mnist_mlflow.config import (
    AUTO_THREADS,
    RUNTIME_SETTINGS,
    ServerAway,
    TrainConfig,
    UserError,
)
from mnist_mlflow.mlrun import MlflowRun, lease_of
from mnist_mlflow.record import EXPERIMENT_TAGS, settings_record
from mnist_mlflow.runtime import Share, auto_threads, busy_cores, omp_limit, usable_cores
from mnist_mlflow.schema import (
    BEST_CHILD_VAL_ACC,
    BEST_GROUP_VAL_ACC,
    CHILDREN_FINISHED,
    CHILDREN_NOT_FINISHED,
    CHILDREN_TAGS,
    COMMAND_TAG,
    CONFIG_GROUP_TAG,
    DEFAULT_EXPERIMENT,
    DESCRIPTION_TAG,
    FINAL_VAL_ACC,
    MEAN_CHILD_VAL_ACC,
    PHASE_TAG,
    PLAN_ARTIFACT,
    ROLE_TAG,
    ROUND_TAG,
    SUMMARY_STEP,
    SWEEP_PARAMS,
    SWEEP_ROLE,
    TRAIN_ROLE,
    config_from_params,
    settings_of,
)
from mnist_mlflow.store import open_store, server_away, server_away_reason, without_retries
from mnist_mlflow.tracking import (
    Destination,
    RunInterrupted,
    Training,
    resumable_run,
    train,
)

log = logging.getLogger("mnist_mlflow")

# MLflow run statuses a child can end in, and the one it waits in before it starts.
TERMINAL = ("FINISHED", "FAILED", "KILLED")
SCHEDULED = RunStatus.to_string(RunStatus.SCHEDULED)


@dataclass(frozen=True)
class ChildJob:
    """One child to train: `config` into run `run_id`, or, with `resume`, go on with that run
    from its checkpoint. Everything a worker needs besides the tracking store and MNIST."""

    config: TrainConfig
    run_id: str
    resume: bool = False


@dataclass(frozen=True)
class ChildOutcome:
    """How one child ended: FINISHED, FAILED or KILLED, with the reason when it did not finish;
    SCHEDULED when the sweep stopped before it began."""

    config: TrainConfig
    run_id: str
    status: str
    error: str = ""


class Executor(Protocol):
    """Runs child jobs; yields each one's outcome as it ends."""

    def run(self, jobs: Sequence[ChildJob], data_dir: Path | str,
            progress: bool) -> Iterator[ChildOutcome]: ...


@dataclass(frozen=True)
class SweepResult:
    parent_run_id: str
    children: list[ChildOutcome]

    @property
    def failed(self) -> list[ChildOutcome]:
        return [c for c in self.children if c.status != "FINISHED"]

    def count(self, status: str) -> int:
        return sum(1 for c in self.children if c.status == status)


@dataclass(frozen=True)
class SweepPlan:
    """How a local sweep runs its children: `workers` side by side, each with `threads`
    under --threads auto (0: the children's own settings), and why."""

    workers: int
    threads: int
    reason: str


def parse_workers(text: str) -> int:
    """--workers: 'auto' (0 here) or a count >= 1; UserError otherwise."""
    if text == AUTO_THREADS:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"invalid --workers {text!r}: must be auto or a count >= 1")
    return int(text)


def plan_sweep(children: int, threads: str, workers: int) -> SweepPlan:
    """Workers and threads for `children` children given --threads and --workers (0: auto).

    auto takes the cores free now: as many children side by side as fit, one thread each
    (a 6,000-parameter net gains little from a second thread: two children on two cores
    beat one child on both), and the spare cores spread over them when the children are
    fewer than the cores.
    """
    cores = usable_cores()
    if threads == AUTO_THREADS:
        fixed = omp_limit()  # 0: the sweep chooses each child's threads
    elif threads == "0":
        fixed = cores  # torch's default takes every core
    else:
        fixed = int(threads)
    per_child = fixed or 1
    busy = busy_cores()
    free = auto_threads(cores, busy)
    count = min(children, workers or max(1, free // per_child))
    if workers:
        why = f"--workers {workers}"
    else:
        why = f"auto: {free} of {cores} cores free ({busy:.1f} busy at the start)"
    if count <= 1:
        return SweepPlan(1, 0, f"{why}: one child after another")
    if fixed:
        return SweepPlan(count, 0, f"{why}: {count} children side by side with {fixed} "
                                   f"thread{'s' if fixed > 1 else ''} each, as set")
    share = max(1, free // count)
    return SweepPlan(count, share, f"{why}: {count} children side by side with {share} "
                                   f"thread{'s' if share > 1 else ''} each")



# Why a child ended KILLED when the process training it died (kill -9, the out-of-memory
# killer): a pool's worker or a Ray worker. KILLED, not FAILED: nothing in the child failed,
# and `sweep --resume` goes on from its checkpoint in the same run.
WORKER_DIED = ("its worker process died (killed, or out of memory); its checkpoint is kept for "
               "`mnist-mlflow sweep --resume`")


ORPHAN_CHILD = ("the sweep stopped while it created this child, before the child had its "
                "settings; `sweep --resume` trained the configuration in a new child")


def train_child(job: ChildJob, data_dir: Path | str, progress: bool = True,
                share: Share | None = None) -> ChildOutcome:
    """Train one job into its run, wherever this runs, with the `share` of the machine the
    sweep gave it; a failure is recorded, not raised.

    An interruption (RunInterrupted, KeyboardInterrupt) is raised after the run is KILLED.
    """
    return train_stacked([job], data_dir, progress, share)[0]


def train_stacked(jobs: Sequence[ChildJob], data_dir: Path | str, progress: bool = True,
                  share: Share | None = None) -> list[ChildOutcome]:
    """Train `jobs`, seeds of one configuration (or one job, or one job to resume), in the
    same passes (mnist_mlflow.stacked), each into its own run; failures are recorded."""
    first = jobs[0]
    try:
        if first.resume:
            # How it runs comes from this sweep's command line, as for the new children.
            runtime = {name: getattr(first.config, name) for name in RUNTIME_SETTINGS}
            what = Training(resume=first.run_id, given=runtime, share=share)
        else:
            what = Training(tuple(job.config for job in jobs),
                            tuple(job.run_id for job in jobs), share=share)
        train(what, data_dir, Destination(patient=True), progress)
    except (RunInterrupted, ServerAway):  # the sweep stops: the next child would find no server
        raise
    except KeyboardInterrupt:  # before training began: the runs never started
        for job in jobs:
            end_unless_ended(job.run_id, RunStatus.KILLED, "interrupted before training began")
        raise
    except Exception as err:  # one child's crash must not stop the others
        reason = f"{type(err).__name__}: {err}"
        outcomes = []
        for job in jobs:
            log.error("child %s failed: %s", job.config.run_name, reason)
            # Training ends its runs FAILED itself, unless it failed before it began.
            end_unless_ended(job.run_id, RunStatus.FAILED, reason)
            outcomes.append(ChildOutcome(job.config, job.run_id, "FAILED", reason))
        return outcomes
    return [ChildOutcome(job.config, job.run_id, "FINISHED") for job in jobs]


def end_unless_ended(run_id: str, status: int, reason: str,
                     keep_scheduled: bool = False) -> None:
    """End run `run_id` with `status` and `reason` unless it already ended (or, with
    `keep_scheduled`, never began: resume then trains it in its own run)."""
    run = MlflowRun(run_id)
    current = run.client.get_run(run_id).info.status
    if current in TERMINAL or (keep_scheduled and current == SCHEDULED):
        return
    run.end(status, reason)


# Why a child that a stopping sweep cut short ended KILLED.
_RESUME_IT = "resume it with `mnist-mlflow sweep --resume PARENT_RUN_ID`"
SWEEP_INTERRUPTED = f"the sweep was interrupted; {_RESUME_IT}"
SERVER_AWAY_STOP = ("the sweep stopped: its tracking server did not answer another child "
                    f"through MLflow's retries; {_RESUME_IT}")


def stop_unfinished(jobs: Iterable[ChildJob], err: BaseException) -> None:
    """End KILLED the runs of `jobs` that a sweep stopping for `err` cut short (one that never
    began stays SCHEDULED: resume trains it in its own run).

    When the sweep stops because its server is away, each run gets one untried request:
    minutes more of MLflow's retries per run would tell a server that is not there. A run it
    cannot tell shows RUNNING, its lease naming a process that is gone: `sweep --resume`
    takes it as it takes a KILLED one. `err`'s message then counts the children stopped.
    """
    jobs = list(jobs)
    if not isinstance(err, ServerAway):
        for job in jobs:
            end_unless_ended(job.run_id, RunStatus.KILLED, SWEEP_INTERRUPTED,
                             keep_scheduled=True)
        return
    if jobs:
        many = len(jobs) > 1
        err.what += (f"; the sweep stopped {len(jobs)} more unfinished "
                     f"child{'ren, each' if many else ''} with the checkpoints of its finished "
                     "epochs")
    with without_retries():
        for job in jobs:
            try:
                end_unless_ended(job.run_id, RunStatus.KILLED, SERVER_AWAY_STOP,
                                 keep_scheduled=True)
            except MlflowException:  # still away: the others would not be told either
                return


class LocalExecutor:
    """The jobs one after another, in this process; with `stack_seeds`, the new children
    that differ only in their seed as one stacked model (mnist_mlflow.stacked)."""

    def __init__(self, stack_seeds: bool = False) -> None:
        self.stack_seeds = stack_seeds

    def run(self, jobs: Sequence[ChildJob], data_dir: Path | str,
            progress: bool) -> Iterator[ChildOutcome]:
        for group in (stacks(jobs) if self.stack_seeds else [[job] for job in jobs]):
            yield from train_stacked(group, data_dir, progress)


def stacks(jobs: Sequence[ChildJob]) -> list[list[ChildJob]]:
    """The jobs grouped by all but their seed, in order of first appearance; a job that
    resumes a run goes alone (it starts at its own epoch)."""
    groups: dict[object, list[ChildJob]] = {}
    for index, job in enumerate(jobs):
        key = index if job.resume else job.config.config_group
        groups.setdefault(key, []).append(job)
    return list(groups.values())


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


def sweep_name(phase: str, configs: Sequence[TrainConfig]) -> str:
    """The parent's name, for what it trains: `sweep gap: gap8k, gap5k s1-3`,
    `sweep opt, opt d0.05 s1`."""
    seeds = sorted(dict.fromkeys(c.seed for c in configs))
    if len(seeds) == 1:
        seed_part = f"s{seeds[0]}"
    elif seeds == list(range(seeds[0], seeds[-1] + 1)):
        seed_part = f"s{seeds[0]}-{seeds[-1]}"
    else:
        seed_part = "s" + ",".join(map(str, seeds))
    variants = dict.fromkeys(c.model + (f" d{c.dropout:g}" if c.dropout else "")
                             for c in configs)
    return f"sweep {phase + ': ' if phase else ''}{', '.join(variants)} {seed_part}"


def start_parent(experiment: str, configs: Sequence[TrainConfig], phase: str = "",
                 command: str = "", runner_run_id: str | None = None,
                 phase_description: str = "", rounds: bool = False) -> MlflowRun:
    """Create the parent run (or adopt the one `mlflow run` made) and record what it sweeps:
    the settings all children share as params, and every child's config as the plan (with
    `rounds`, the first round's: a sequential sweep adds more)."""
    recorded = [settings_record(c)[0] for c in configs]
    shared = {k: v for k, v in recorded[0].items() if all(r[k] == v for r in recorded)}
    variants = dict.fromkeys(f"{c.model}:{c.dropout:g}" for c in configs)
    seeds = dict.fromkeys(str(c.seed) for c in configs)
    what = phase_description or f"variants {', '.join(variants)}"
    description = (f"Sweep of phase `{phase}`: {what}" if phase else f"Sweep of {what}")
    children = f"{'a first round of ' if rounds else ''}{len(configs)} children"
    description += (f"; {children}, seeds {', '.join(seeds)}. Command: `{command}`" if command
                    else f"; {children}.")
    parent = MlflowRun.create_or_adopt(
        runner_run_id, experiment, sweep_name(phase, configs),
        # No phase tag outside a phase: an empty one reads as a phase with no name.
        tags={ROLE_TAG: SWEEP_ROLE, COMMAND_TAG: command, **({PHASE_TAG: phase} if phase else {})},
        description=description, experiment_tags=EXPERIMENT_TAGS)
    parent.log_new_params({**shared,
                           **dict(zip(SWEEP_PARAMS, (",".join(variants), ",".join(seeds),
                                                     phase or "none", len(configs)),
                                      strict=True))})
    log_plan(parent, configs)
    parent.hold_lease()
    return parent


def log_plan(parent: MlflowRun, configs: Sequence[TrainConfig]) -> None:
    """Every child's settings, as the parent's plan (`--resume` trains what is unfinished of
    it); a sequential sweep logs it again as each round adds children."""
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / PLAN_ARTIFACT
        plan.write_text(json.dumps([c.as_params() for c in configs], indent=1))
        parent.log_artifact(plan)


def create_child(parent: MlflowRun, config: TrainConfig,
                 tags: Mapping[str, str] | None = None) -> ChildJob:
    """The child's run, SCHEDULED under `parent` with its params (and `tags`), and the job
    that trains it."""
    parent_tags = parent.client.get_run(parent.run_id).data.tags
    params, settings_tags = settings_record(config)
    child = MlflowRun.create(
        parent.client.get_experiment(parent.experiment_id).name, config.run_name,
        parent_run_id=parent.run_id,
        tags={ROLE_TAG: TRAIN_ROLE, **{k: v for k, v in parent_tags.items() if k == PHASE_TAG},
              **settings_tags, **(tags or {})},
        description=f"{config.variant_name}, seed {config.seed}: waiting for its turn.")
    child.log_new_params(params)
    child.client.update_run(child.run_id, status=SCHEDULED)
    return ChildJob(config, child.run_id)


def run_sweep(configs: Sequence[TrainConfig], data_dir: Path | str,
              experiment: str = DEFAULT_EXPERIMENT, progress: bool = True, phase: str = "",
              command: str = "", runner_run_id: str | None = None,
              executor: Executor | None = None, phase_description: str = "") -> SweepResult:
    """Train every config as a child of one new parent; the parent ends FAILED if any did."""
    open_store()
    parent = start_parent(experiment, configs, phase, command, runner_run_id, phase_description)
    jobs = [create_child(parent, config) for config in configs]
    return train_children(parent, jobs, [], data_dir, progress, executor or LocalExecutor())


def resume_sweep(parent_run_id: str, data_dir: Path | str,
                 given: Mapping[str, object] | None = None, progress: bool = True,
                 executor: Executor | None = None, end: bool = True) -> SweepResult:
    """Train, under the same parent, only the children of a sweep that did not finish.

    Children are matched to the sweep's variants by what they learn; a killed one goes on from
    its checkpoint, one that never began trains in its own run, any other unfinished one is
    trained again as a new child. `given` may change how the children run (device,
    precision, compile, threads), nothing else.
    """
    open_store()
    client = store.client()
    try:
        parent_run = client.get_run(parent_run_id)
    except MlflowException:
        raise UserError(f"no run {parent_run_id!r} in the tracking store "
                        f"{client.tracking_uri}") from None
    if parent_run.data.tags.get(ROLE_TAG) != SWEEP_ROLE:
        raise UserError(f"run {parent_run_id} is not a sweep's parent run")
    if parent_run.info.status == "FINISHED":
        raise UserError(f"sweep {parent_run_id} is FINISHED: every child finished")
    lease = lease_of(parent_run)
    if lease is not None and lease.alive:
        raise UserError(f"sweep {parent_run_id} is running right now ({lease.describe()}); "
                        "stop that process first")
    given = dict(given or {})
    overrides = {name: given.pop(name) for name in RUNTIME_SETTINGS if name in given}
    latest = _latest_children(client, parent_run)
    configs = [dataclasses.replace(
        config_from_params(parent_run_id, {k: str(v) for k, v in settings.items()}, given),
        **overrides) for settings in _plan(client, parent_run, latest)]
    parent = MlflowRun(parent_run_id, client)
    parent.reopen()
    parent.hold_lease()
    finished: list[ChildOutcome] = []
    jobs: list[ChildJob] = []
    for config in configs:
        child = latest.get(config.what_it_learns())
        status = child.info.status if child is not None else ""
        if status == "FINISHED":
            finished.append(ChildOutcome(config, child.info.run_id, "FINISHED"))
        elif status == SCHEDULED:
            jobs.append(ChildJob(config, child.info.run_id))
        elif child is not None and _resumable(client, child.info.run_id):
            jobs.append(ChildJob(config, child.info.run_id, resume=True))
        else:
            # Trained again in a new child: in the same round of a sequential sweep.
            carried = {k: v for k, v in (child.data.tags if child else {}).items()
                       if k == ROUND_TAG}
            jobs.append(create_child(parent, config, carried))
    return train_children(parent, jobs, finished, data_dir, progress,
                          executor or LocalExecutor(), end)


def _plan(client: MlflowClient, parent: Run, children: Mapping[TrainConfig, Run]
          ) -> list[dict[str, object]]:
    """The settings of every child, as the parent recorded them when the sweep started. When
    that record is gone (its files deleted), the children made so far stand for it: each
    holds its settings as params, and a sweep makes its children before training any."""
    parent_run_id = parent.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_run_id, PLAN_ARTIFACT, tmp)
            return json.loads(Path(path).read_text())
        except (MlflowException, OSError, ValueError) as err:
            if not children:
                raise UserError(f"sweep {parent.info.run_name} ({parent_run_id}) has no "
                                f"readable {PLAN_ARTIFACT} and no children: it cannot be "
                                "resumed; start the sweep again") from None
            log.warning("sweep %s (%s): its %s is %s; going on with the %d children it made, "
                        "from their params", parent.info.run_name, parent_run_id,
                        PLAN_ARTIFACT, "unreadable" if isinstance(err, ValueError) else "gone",
                        len(children))
    return [settings_of(run) for run in children.values()]


def _latest_children(client: MlflowClient, parent: Run) -> dict[TrainConfig, Run]:
    """The most recent child run of each configuration under `parent` (keyed by what it
    learns: the device or threads it ran with do not make another child)."""
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent.info.run_id}'",
                              max_results=SEARCH_MAX_RESULTS_THRESHOLD,
                              order_by=["attributes.start_time ASC"])
    latest = {}
    for run in runs:
        if not run.data.params:
            # The sweep was killed (kill -9) between creating this child and logging its
            # settings: it never trained. Ended, so it is not left RUNNING; a new child
            # takes its place.
            end_unless_ended(run.info.run_id, RunStatus.KILLED, ORPHAN_CHILD)
            continue
        latest[config_from_params(run.info.run_id, settings_of(run), {}).what_it_learns()] = run
    return latest


def _resumable(client: MlflowClient, run_id: str) -> bool:
    """Whether `run_id` can go on from a checkpoint (else it is trained anew)."""
    try:
        resumable_run(client, run_id)
    except UserError:
        return False
    return True


def train_children(parent: MlflowRun, jobs: Sequence[ChildJob],
                   finished: Iterable[ChildOutcome], data_dir: Path | str, progress: bool,
                   executor: Executor, end: bool = True) -> SweepResult:
    """Hand `jobs` to `executor`, collect the outcomes, and end the parent by them (unless
    `end` is False and every child finished: a sequential sweep has rounds to go). A parent
    whose children were stopped ends KILLED whatever `end` says."""
    children = list(finished)
    started = {job.run_id: job for job in jobs}
    outcomes = executor.run(jobs, data_dir, progress)
    resume = f"mnist-mlflow sweep --resume {parent.run_id}"
    try:
        for outcome in outcomes:
            children.append(outcome)
            started.pop(outcome.run_id, None)
            parent.heartbeat()
    except KeyboardInterrupt as err:
        try:
            # A signal while this loop, not the executor, ran: the executor stops its children
            # first (from an executor that raised it, this raises it again).
            outcomes.throw(err)
        except KeyboardInterrupt as stopped:
            err = stopped
        run_id = getattr(err, "run_id", None)
        if run_id in started:
            job = started.pop(run_id)
            children.append(ChildOutcome(job.config, run_id, "KILLED", str(err)))
        children += [ChildOutcome(job.config, job.run_id, _status(parent, job.run_id))
                     for job in started.values()]
        end_parent(parent, SweepResult(parent.run_id, children), RunStatus.KILLED)
        if isinstance(err, RunInterrupted):
            err.command = resume
        raise err  # the executor's, which says which child stopped where
    except Exception as err:
        away = _server_away(err, outcomes)
        if away is None:
            raise
        # The parent cannot be told either: it shows RUNNING until resumed.
        away.command = resume
        if away is err:
            raise
        raise away from err
    result = SweepResult(parent.run_id, children)
    if end or result.failed:
        end_parent(parent, result, RunStatus.FAILED if result.failed else RunStatus.FINISHED)
    return result


def _server_away(err: Exception, outcomes: Iterator[ChildOutcome]) -> ServerAway | None:
    """`err` as a ServerAway if it says the tracking server did not answer through MLflow's
    retries: a child's (its executor has stopped the others), or this process's own request,
    after which the executor stops its children as for a child's; else None."""
    if isinstance(err, ServerAway):
        return err
    error = server_away(err)
    if not error:
        return None
    away = ServerAway(server_away_reason(error), "")
    try:
        outcomes.throw(away)  # the executor's generator stops its children
    except ServerAway:
        pass
    return away


def _status(parent: MlflowRun, run_id: str) -> str:
    return parent.client.get_run(run_id).info.status


def end_parent(parent: MlflowRun, result: SweepResult, status: int) -> None:
    """Record how many children finished, failed, were killed or never began, and the best
    group of the finished ones (the parent's description says it, its metrics count it);
    end the parent."""
    counts = {name: result.count(name) for name in (*TERMINAL, SCHEDULED)}
    parent.set_tags({CHILDREN_TAGS[name]: str(count) for name, count in counts.items()})
    outcome = (f"{counts['FINISHED']} of {len(result.children)} children finished"
               + "".join(f", {count} {name}" for name, count in counts.items()
                         if count and name != "FINISHED") + ".")
    groups = _val_accs(parent.client, [c.run_id for c in result.children
                                       if c.status == "FINISHED"])
    metrics = {CHILDREN_FINISHED: counts["FINISHED"],
               CHILDREN_NOT_FINISHED: len(result.children) - counts["FINISHED"]}
    if groups:
        every = [value for values in groups.values() for value in values]
        # The children's best and mean, so that the parent's row reads in the runs table.
        metrics |= {BEST_CHILD_VAL_ACC: round(max(every), 2),
                    MEAN_CHILD_VAL_ACC: round(sum(every) / len(every), 2)}
        name, values = max(groups.items(), key=lambda item: sum(item[1]) / len(item[1]))
        mean, seeds = sum(values) / len(values), len(values)
        outcome += (f" Best group by mean {FINAL_VAL_ACC}: {name}, {mean:.2f} over {seeds} "
                    f"seed{'s' if seeds > 1 else ''} (`mnist-mlflow compare` says whether it "
                    "beats the others).")
        metrics[BEST_GROUP_VAL_ACC] = round(mean, 2)
    description = parent.client.get_run(parent.run_id).data.tags.get(DESCRIPTION_TAG, "")
    parent.describe(f"{description.split(' Outcome: ')[0]} Outcome: {outcome}")
    parent.log_metrics(metrics, step=SUMMARY_STEP)
    parent.end(status)


def _val_accs(client: MlflowClient, run_ids: Sequence[str]) -> dict[str, list[float]]:
    """The final_val_acc of each of these runs that has one, by config_group."""
    groups: dict[str, list[float]] = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        if FINAL_VAL_ACC in run.data.metrics:
            groups.setdefault(run.data.tags.get(CONFIG_GROUP_TAG, "?"), []).append(
                run.data.metrics[FINAL_VAL_ACC])
    return groups
