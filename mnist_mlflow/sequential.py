"""`sweep --until-decided`: seeds trained in rounds until the call is made.

The first round trains every variant on `first` seeds; after each round the sweep's groups
are judged as `compare` judges them (comparison.assess, on the sweep's own children and
production), and rounds.call_round says whether the call is made or which groups get
`per_round` more seeds. Each round spends its share of this look's error allowance
(stats.round_shares), so the whole procedure, every round and the last compare, promotes
falsely at most as often as one `compare` may. The last compare registers as
`compare --register` does, at the last round's share.

Each round is visible in the MLflow UI: children carry their round as a tag, the parent's
description and `mnist_mlflow.rounds` tag say where the sweep stands, `round_best_mean` is
the leader's mean by round, and `rounds.json` holds every call. A stopped sweep goes on with
`sweep --resume`: the unfinished children of the round first, then the rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnist_mlflow import store
from mnist_mlflow.comparison import assess, compare
from mnist_mlflow.config import ServerAway, TrainConfig, UserError
from mnist_mlflow.mlrun import MlflowRun
from mnist_mlflow.report import Comparison
from mnist_mlflow.rounds import MORE, RoundCall, call_round
from mnist_mlflow.schema import (
    DEFAULT_MIN_EFFECT,
    DEFAULT_MODEL_NAME,
    DESCRIPTION_TAG,
    PHASE_TAG,
    ROUND_BEST,
    ROUND_TAG,
    ROUNDS_ARTIFACT,
    ROUNDS_TAG,
    SEQUENTIAL_PARAMS,
)
from mnist_mlflow.selection import SelectionRule
from mnist_mlflow.stats import round_seeds, round_shares
from mnist_mlflow.store import open_store, store_error
from mnist_mlflow.sweep import (
    ChildJob,
    ChildOutcome,
    Executor,
    LocalExecutor,
    SweepResult,
    create_child,
    end_parent,
    log_plan,
    resume_sweep,
    start_parent,
    sweep_name,
    train_children,
)

log = logging.getLogger("mnist_mlflow")

# Where the parent's description says how the rounds stand (the sweep's outcome follows).
ROUNDS_HEADING = "\n\n**Until decided**: "


@dataclass(frozen=True)
class Rounds:
    """How a sequential sweep runs: `first` seeds per group, then `per_round` more a round
    for the groups still in contention, at most `max_seeds`; differences smaller than
    `min_effect` points are not worth more seeds; the last compare registers to
    `model_name`."""

    first: int = 3
    per_round: int = 2
    max_seeds: int = 10
    min_effect: float = DEFAULT_MIN_EFFECT
    model_name: str = DEFAULT_MODEL_NAME

    def validate(self) -> Rounds:
        if self.first < 2:
            raise UserError(f"invalid --first-round: at least 2 seeds, so that a group's seed "
                            f"spread is known, got {self.first}")
        if self.per_round < 1:
            raise UserError(f"invalid --round-seeds: at least 1, got {self.per_round}")
        if self.max_seeds < self.first:
            raise UserError(f"invalid --max-seeds: at least the first round's {self.first}, "
                            f"got {self.max_seeds}")
        if not self.min_effect > 0:
            raise UserError(f"invalid --min-effect: must be > 0 points, got {self.min_effect}")
        return self

    @property
    def seeds(self) -> list[int]:
        """Seeds per group after each round."""
        return round_seeds(self.first, self.per_round, self.max_seeds)

    @property
    def shares(self) -> list[float]:
        return round_shares(self.seeds)

    def params(self) -> dict[str, object]:
        return dict(zip(SEQUENTIAL_PARAMS, (self.first, self.per_round, self.max_seeds,
                                            self.min_effect, self.model_name), strict=True))

    @classmethod
    def of(cls, params: Mapping[str, str]) -> Rounds | None:
        """The rounds a parent's params record; None for a sweep without them."""
        if not all(name in params for name in SEQUENTIAL_PARAMS):
            return None
        first, per_round, most, effect, model = (params[name] for name in SEQUENTIAL_PARAMS)
        return cls(int(first), int(per_round), int(most), float(effect), model)


@dataclass(frozen=True)
class SequentialResult:
    """Every child the rounds trained, each round's call, and the last compare (None when a
    child did not finish: the parent then ended FAILED or KILLED, and `--resume` goes on)."""

    sweep: SweepResult
    calls: list[dict[str, object]]
    comparison: Comparison | None


def run_until_decided(configs: Sequence[TrainConfig], rounds: Rounds, data_dir: Path | str,
                      experiment: str, progress: bool = True, phase: str = "",
                      command: str = "", runner_run_id: str | None = None,
                      executor: Executor | None = None,
                      phase_description: str = "") -> SequentialResult:
    """Train `configs` (the first round: every variant over its first seeds) under a new
    parent, then round after round until the call is made; register as compare does."""
    rounds.validate()
    open_store()
    parent = start_parent(experiment, configs, phase, command, runner_run_id,
                          phase_description, rounds=True)
    parent.log_new_params(rounds.params())
    jobs = [create_child(parent, config, {ROUND_TAG: "1"}) for config in configs]
    return _go_on(parent, rounds, 1, jobs, [], [], data_dir, progress,
                  executor or LocalExecutor())


def resume(parent_run_id: str, data_dir: Path | str,
           given: Mapping[str, object] | None = None, progress: bool = True,
           executor: Executor | None = None) -> SweepResult | SequentialResult:
    """`sweep --resume`: a sweep without rounds as sweep.resume_sweep does; a sequential one
    trains its round's unfinished children, then goes on with the rounds."""
    client = store.client()
    try:
        params = client.get_run(parent_run_id).data.params
    except MlflowException:
        params = {}  # resume_sweep says what is wrong
    rounds = Rounds.of(params)
    if rounds is None:
        return resume_sweep(parent_run_id, data_dir, given, progress, executor)
    result = resume_sweep(parent_run_id, data_dir, given, progress, executor, end=False)
    parent = MlflowRun(parent_run_id, client)
    if result.failed:
        return SequentialResult(result, _calls(parent), None)
    # The round its children reached (one may have been made before the sweep stopped).
    children = client.search_runs(
        [parent.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
        max_results=SEARCH_MAX_RESULTS_THRESHOLD)
    round_no = max(int(run.data.tags.get(ROUND_TAG, "1")) for run in children)
    return _go_on(parent, rounds, round_no, [], result.children, _calls(parent), data_dir,
                  progress, executor or LocalExecutor())


def _go_on(parent: MlflowRun, rounds: Rounds, round_no: int, jobs: Sequence[ChildJob],
           finished: list[ChildOutcome], calls: list[dict[str, object]], data_dir: Path | str,
           progress: bool, executor: Executor) -> SequentialResult:
    """Train `jobs` (round `round_no`'s unfinished children), call the round, and go on until
    the call is made; then compare and register."""
    try:
        return _rounds(parent, rounds, round_no, jobs, finished, calls, data_dir, progress,
                       executor)
    except BaseException as err:
        # Stopped or failed between the children (calling a round, logging it, the last
        # compare): the parent is not left RUNNING. A server away cannot be told; a child
        # stopped has ended the parent already.
        if not isinstance(err, ServerAway) and _running(parent):
            status = RunStatus.KILLED if isinstance(err, KeyboardInterrupt) \
                else RunStatus.FAILED
            with contextlib.suppress(Exception):
                parent.end(status, f"{type(err).__name__}: {store_error(err)}; go on with "
                                   f"mnist-mlflow sweep --resume {parent.run_id}")
        raise


def _running(parent: MlflowRun) -> bool:
    with contextlib.suppress(Exception):
        return parent.client.get_run(parent.run_id).info.status == "RUNNING"
    return False


def _rounds(parent: MlflowRun, rounds: Rounds, round_no: int, jobs: Sequence[ChildJob],
            finished: list[ChildOutcome], calls: list[dict[str, object]],
            data_dir: Path | str, progress: bool, executor: Executor) -> SequentialResult:
    client = parent.client
    experiment = client.get_experiment(parent.experiment_id).name
    rule = SelectionRule()
    children = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}'"
    while True:
        result = train_children(parent, jobs, finished, data_dir, progress, executor,
                                end=False)
        if result.failed:
            return SequentialResult(result, calls, None)
        share = rounds.shares[round_no - 1]
        comparison, _, _ = assess(experiment, children, rule, data_dir=data_dir,
                                  model_name=rounds.model_name, min_effect=rounds.min_effect,
                                  share=share)
        out = {name for call in calls[:round_no - 1] for name in call["out"]}
        call = call_round(comparison.eligible, out, rule, comparison.pooled[rule.metric],
                          comparison.verdict.production, share, rounds.min_effect,
                          rounds.max_seeds)
        calls = [*calls[:round_no - 1], _entry(round_no, share, call, rounds, out,
                                               rule.metric)]
        _record(parent, rounds, calls)
        log.info("round %d: %s", round_no, calls[-1]["sentence"])
        if call.kind != MORE or round_no == len(rounds.seeds):
            break
        configs = [c.config for c in result.children]
        new = _next_seeds(configs, call.more, rounds.per_round, rounds.max_seeds)
        log_plan(parent, [*configs, *new])  # before the children: resume trains what it lists
        # Its name says the seeds it trains (`sweep opt, opt d0.05 s1-5`), as a sweep's does.
        client.update_run(parent.run_id, name=sweep_name(
            client.get_run(parent.run_id).data.tags.get(PHASE_TAG, ""), [*configs, *new]))
        round_no += 1
        jobs = [create_child(parent, config, {ROUND_TAG: str(round_no)}) for config in new]
        finished = result.children
    final = compare(experiment, children, rule, data_dir=data_dir, register=True,
                    model_name=rounds.model_name, min_effect=rounds.min_effect, share=share)
    end_parent(parent, result, RunStatus.FINISHED)
    return SequentialResult(result, calls, final)


def _next_seeds(configs: Sequence[TrainConfig], groups: Sequence[str], per_round: int,
                max_seeds: int) -> list[TrainConfig]:
    """`per_round` more seeds (at most `max_seeds` in all) for each of `groups`: the seeds
    after the highest it has."""
    new = []
    for name in groups:
        mine = [c for c in configs if c.config_group == name]
        seeds = sorted({c.seed for c in mine})
        count = min(per_round, max_seeds - len(seeds))
        new += [dataclasses.replace(mine[0], seed=seeds[-1] + 1 + i) for i in range(count)]
    return new


def _entry(round_no: int, share: float, call: RoundCall, rounds: Rounds, out: set[str],
           metric: str) -> dict[str, object]:
    """One round as rounds.json keeps it."""
    return {"round": round_no, "share": round(share, 4), "kind": call.kind,
            "best": call.best.name, "best_mean": call.best.mean(metric),
            "seeds": call.best.n, "more": list(call.more),
            "pairs": {pair.other: pair.state for pair in call.pairs},
            "out": sorted(out | set(call.out)),
            "sentence": call.sentence(rounds.min_effect)}


def _record(parent: MlflowRun, rounds: Rounds, calls: list[dict[str, object]]) -> None:
    """Where the rounds stand, where the UI shows it: the parent's description and tag, the
    leader's mean by round, and rounds.json."""
    last = calls[-1]
    most = len(rounds.seeds)
    where = f"round {last['round']} of at most {most}: {last['kind']}"
    if last["kind"] != MORE and last.get("pairs"):  # how each other stands against the best
        where += f" ({'; '.join(f'{o}: {state}' for o, state in last['pairs'].items())})"
    if last["more"]:
        where += f"; next: {rounds.per_round} more seeds for {', '.join(last['more'])}"
    description = parent.client.get_run(parent.run_id).data.tags.get(DESCRIPTION_TAG, "")
    history = "\n".join(f"- Round {c['round']} ({c['seeds']} seeds a group, {c['share']:.0%} "
                        f"of the error allowance): {c['sentence']}" for c in calls)
    parent.describe(f"{description.split(ROUNDS_HEADING)[0].rstrip()}{ROUNDS_HEADING}{where}."
                    f"\n\n{history}")
    parent.set_tags({ROUNDS_TAG: where})
    parent.log_metrics({ROUND_BEST: round(float(last["best_mean"]), 3)}, step=int(last["round"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ROUNDS_ARTIFACT
        path.write_text(json.dumps(calls, indent=1))
        parent.log_artifact(path)


def _calls(parent: MlflowRun) -> list[dict[str, object]]:
    """The calls made so far, from rounds.json (none when it is gone: the rounds are called
    again from the children, which is the same)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = parent.client.download_artifacts(parent.run_id, ROUNDS_ARTIFACT, tmp)
            return json.loads(Path(path).read_text())
        except (MlflowException, OSError, ValueError):
            return []


