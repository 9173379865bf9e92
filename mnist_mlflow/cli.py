"""Command line: `mnist-mlflow train ...`. Thin: parses options, calls the modules, maps errors.

Imports no torch at module level: `compare`, `models`, `promote` and every `--help` start in
the time MLflow takes to import, and only the commands that train load torch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mnist_mlflow import __version__
from mnist_mlflow.config import (
    DiskFull,
    ServerAway,
    TrainConfig,
    TrainingDiverged,
    UserError,
    raise_terminated,
)
from mnist_mlflow.phases import DEFAULT_PHASE, PHASES
from mnist_mlflow.schema import (
    DEFAULT_EXPERIMENT,
    DEFAULT_MIN_EFFECT,
    DEFAULT_MODEL_NAME,
    FINAL_VAL_ACC,
    SEQUENTIAL_PARAMS,
)

if TYPE_CHECKING:  # compare's modules load only when a command needs them
    from mnist_mlflow.report import Comparison

DEFAULTS = TrainConfig()
CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}


class SettingChoice(click.Choice):
    """click.Choice that refuses a value in the words TrainConfig.validate uses."""

    def __init__(self, name: str, choices: tuple[str, ...]) -> None:
        super().__init__(choices)
        self.setting = name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value not in self.choices:
            raise UserError(f"invalid {self.setting}: must be one of "
                            f"{', '.join(map(str, self.choices))}, got {value!r}")
        return value


def setting_option(f: dataclasses.Field) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The command-line option of one TrainConfig field: its default, help and choices."""
    default = f.default
    kind = SettingChoice(f.name, f.metadata["choices"]) if f.metadata["choices"] else (
        CLICK_TYPES[type(default)])
    extra: dict[str, Any] = {}
    if isinstance(default, bool):
        # `--deterministic` alone turns it on; `--deterministic false` (as MLproject passes
        # its parameters) says so explicitly.
        extra = {"is_flag": False, "flag_value": True, "metavar": "[BOOLEAN]"}
    return click.option(f"--{f.name.replace('_', '-')}", f.name, type=kind, default=default,
                        show_default=True, help=f.metadata["help"], **extra)


def training_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every training command shares: one per TrainConfig field, then where the
    data and the runs go."""
    options = [setting_option(f) for f in dataclasses.fields(TrainConfig)]
    options += [
        # --data_dir too: `mlflow run -P data_dir=...` passes an undeclared parameter so.
        click.option("--data-dir", "--data_dir", "data_dir",
                     default=lambda: os.environ.get("MNIST_DATA_DIR", "data"),
                     show_default="data/ or $MNIST_DATA_DIR",
                     help="Folder holding MNIST/raw (downloaded there when missing)."),
        click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True,
                     help="MLflow experiment (under `mlflow run`, its --experiment-name wins)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def config_from(options: dict[str, Any]) -> TrainConfig:
    """Build the TrainConfig from the parsed options (ignoring those that are not settings)."""
    return TrainConfig(**{k: v for k, v in options.items() if k in TrainConfig.field_names()})


def invoked_command() -> str:
    """This command line as the user would type it again, for the record in the store."""
    return shlex.join(["mnist-mlflow", *sys.argv[1:]])


def check_experiment(name: str) -> None:
    if not name.strip():
        raise UserError("invalid --experiment: the name is empty")


def writable_path(path: Path, what: str) -> Path:
    """`path` if its files can be written: --report's folder is made if need be, --results'
    folder must exist."""
    folder = path if what == "--report" else path.parent
    if what == "--report":  # a report folder is made; a results file goes into one that is
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"invalid {what} {path}: cannot make folder {folder} "
                            f"({err.strerror or err})") from None
    elif not folder.is_dir():
        raise UserError(f"invalid {what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"invalid {what} {path}: folder {folder} is not writable")
    if path.is_dir() and what == "--results":
        raise UserError(f"invalid {what} {path}: it is a folder")
    return path


def runner_run_id(ctx: click.Context) -> str | None:
    """The run `mlflow run` created for this process, if it started us."""
    return ctx.find_root().obj


@click.group()
@click.version_option(__version__, prog_name="mnist-mlflow")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Train, compare and promote compact MNIST CNNs, tracked with MLflow."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # The one place that reads it: `mlflow run` names its run this way. Taken out of the
    # environment so that nothing below adopts it by accident; passed down explicitly.
    ctx.obj = os.environ.pop("MLFLOW_RUN_ID", None) or None


def given_settings(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The settings the user gave on the command line.

    `mlflow run` passes every -P value, defaults included, so there a value equal to the
    default counts as not given.
    """
    under_mlflow_run = runner_run_id(ctx) is not None
    return {name: options[name] for name in TrainConfig.field_names()
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
            and not (under_mlflow_run and options[name] == getattr(DEFAULTS, name))}


@cli.command()
@training_options
@click.option("--resume", "resume_run_id", default="", metavar="RUN_ID",
              help="Go on with this interrupted run from its last checkpoint, with its settings "
                   "(--device, --precision, --compile, --threads and --deterministic may "
                   "differ).")
@click.pass_context
def train(ctx: click.Context, resume_run_id: str, **options: Any) -> None:
    """Train one variant as one MLflow run."""
    from mnist_mlflow.tracking import Destination, Training
    from mnist_mlflow.tracking import train as train_runs

    check_experiment(options["experiment"])
    where = Destination(options["experiment"], runner_run_id(ctx),
                        experiment_given=ctx.get_parameter_source("experiment") is (
                            click.core.ParameterSource.COMMANDLINE))
    what = (Training(resume=resume_run_id, given=given_settings(ctx, options))
            if resume_run_id else Training((config_from(options).validate(),)))
    (result,) = train_runs(what, options["data_dir"], where)
    click.echo(f"run {result.run_id} finished: final test_acc "
               f"{result.history[-1].test_acc:.2f}%")


@cli.command()
@training_options
@click.option("--phase", "phase_name", default="", metavar="NAME",
              help="Train this phase's variants with their recipes: "
                   f"{', '.join(PHASES)} [default: {DEFAULT_PHASE}, unless --variant]. "
                   "Options given here override the phase's recipe.")
@click.option("--variant", "variants", multiple=True, metavar="MODEL:DROPOUT",
              help="Instead of a phase, these variants with the options given here "
                   "(repeatable or comma-separated).")
@click.option("--seeds", default="", metavar="S1,S2,...",
              help="Train every variant once per seed (instead of --seed).")
@click.option("--resume", "resume_run_id", default="", metavar="PARENT_RUN_ID",
              help="Train only the unfinished children of this sweep, under the same parent.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="local: children side by side in processes of this machine (--workers). "
                   "ray: each child a Ray task (pip install -e \".[ray]\"), on a local Ray "
                   "started for the sweep or the cluster at --ray-address.")
@click.option("--workers", default="auto", show_default=True, metavar="auto|N",
              help="Local sweeps: children trained side by side. auto: as many as the cores "
                   "free when the sweep starts allow (each child one thread, or the spare "
                   "cores shared out); 1: one after another in this process.")
@click.option("--stack-seeds", is_flag=True,
              help="Train the seeds of each variant as one stacked model (torch.func, vmap), "
                   "each seed logged to its own child run as if trained alone: how a tiny net "
                   "fills a GPU (on a CPU it gains nothing). In this process.")
@click.option("--ray-address", default="", metavar="ADDR",
              help="Ray cluster to run on (say ray://head:10001 or auto) [default: a local "
                   "Ray with this machine's CPUs].")
@click.option("--cpus-per-run", type=int, default=1, show_default=True,
              help="CPUs each Ray task reserves; its torch uses as many threads.")
@click.option("--gpus-per-run", type=float, default=0.0, show_default=True,
              help="GPUs each Ray task reserves (fractions share one).")
@click.option("--until-decided", is_flag=True,
              help="Train seeds in rounds until the call is made: the best group beats the "
                   "others (and production) beyond noise, no difference as large as "
                   "--min-effect remains, more seeds would likely not decide it, or "
                   "--max-seeds is reached; then compare and register as `compare` does.")
@click.option("--first-round", type=int, default=3, show_default=True, metavar="N",
              help="--until-decided: seeds per variant in the first round (seeds 1..N, "
                   "unless --seeds names them).")
@click.option("--round-seeds", type=int, default=2, show_default=True, metavar="N",
              help="--until-decided: seeds added a round to each group still in contention.")
@click.option("--max-seeds", type=int, default=10, show_default=True, metavar="N",
              help="--until-decided: the most seeds a group gets.")
@click.option("--min-effect", type=float, default=DEFAULT_MIN_EFFECT, show_default=True,
              metavar="POINTS",
              help="--until-decided: the smallest difference worth more seeds.")
@click.option("--model-name", default=DEFAULT_MODEL_NAME, show_default=True,
              help="--until-decided: the registered model the last compare registers to.")
@click.pass_context
def sweep(ctx: click.Context, phase_name: str, variants: tuple[str, ...], seeds: str,
          resume_run_id: str, executor: str, workers: str, stack_seeds: bool,
          ray_address: str, cpus_per_run: int, gpus_per_run: float, until_decided: bool,
          first_round: int, round_seeds: int, max_seeds: int, min_effect: float,
          model_name: str, **options: Any) -> None:
    """Train every variant as a nested child run under one parent run."""
    from mnist_mlflow.phases import over_seeds, parse_seeds, phase, phase_configs
    from mnist_mlflow.process_executor import ProcessExecutor
    from mnist_mlflow.registry import check_model_name
    from mnist_mlflow.sequential import Rounds, SequentialResult, resume, run_until_decided
    from mnist_mlflow.sweep import (
        LocalExecutor,
        parse_variants,
        parse_workers,
        run_sweep,
        sweep_configs,
    )

    check_experiment(options["experiment"])
    if stack_seeds and (executor == "ray" or workers not in ("auto", "1")):
        raise UserError("--stack-seeds trains the stacked seeds in this process: leave out "
                        "--executor ray and --workers")
    if stack_seeds and options.get("compile") == "on":
        raise UserError("--stack-seeds trains eager (vmap): leave out --compile on")
    if stack_seeds:
        children_run_by = LocalExecutor(stack_seeds=True)
    elif executor == "ray":
        from mnist_mlflow.ray_executor import RayExecutor

        if workers != "auto":
            raise UserError("--workers applies to local sweeps; a Ray sweep runs as many "
                            "children as --cpus-per-run lets its cluster hold")
        children_run_by = RayExecutor(ray_address, cpus_per_run, gpus_per_run)
    else:
        if ray_address:
            raise UserError("--ray-address needs --executor ray")
        children_run_by = ProcessExecutor(parse_workers(workers))
    variants = tuple(v for v in variants if v.strip())  # `mlflow run` passes "" for none
    given = given_settings(ctx, options)
    for name in ("model", "dropout"):
        if name in given:
            raise UserError(f"--{name} does not apply to a sweep; use --variant MODEL:DROPOUT")
    if phase_name and variants:
        raise UserError("--phase and --variant exclude each other: a phase names its variants")
    if seeds and "seed" in given:
        raise UserError("--seed and --seeds exclude each other")
    rounds = None
    named = [f"--{name.replace('_', '-')}" for name in ROUND_OPTIONS
             if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    if named and not until_decided:
        raise UserError(f"{', '.join(named)} apply only with --until-decided")
    if until_decided:
        check_model_name(model_name)
        first = len(parse_seeds(seeds)) if seeds else first_round
        rounds = Rounds(first, round_seeds, max_seeds, min_effect, model_name).validate()
    if resume_run_id:
        if variants or phase_name or seeds or until_decided:
            raise UserError("--phase, --variant, --seeds and --until-decided do not apply "
                            "with --resume: the sweep's own are used")
        result = resume(resume_run_id, options["data_dir"], given, executor=children_run_by)
    else:
        description = ""
        if variants:
            configs = sweep_configs(config_from(options), parse_variants(variants))
        else:
            phase_name = phase_name or DEFAULT_PHASE
            configs = phase_configs(phase_name, given)
            description = phase(phase_name).description
        if seeds or rounds:
            configs = over_seeds(configs, parse_seeds(seeds) if seeds
                                 else list(range(1, rounds.first + 1)))
        if rounds:
            result = run_until_decided(
                configs, rounds, options["data_dir"], options["experiment"], phase=phase_name,
                command=invoked_command(), runner_run_id=runner_run_id(ctx),
                executor=children_run_by, phase_description=description)
        else:
            result = run_sweep(configs, options["data_dir"], options["experiment"],
                               phase=phase_name, command=invoked_command(),
                               runner_run_id=runner_run_id(ctx), phase_description=description,
                               executor=children_run_by)
    calls, comparison = [], None
    if isinstance(result, SequentialResult):
        calls, comparison, result = result.calls, result.comparison, result.sweep
    for child in result.children:
        detail = f": {child.error}" if child.error else ""
        click.echo(f"{child.config.run_name}: run {child.run_id} {child.status}{detail}")
    if result.failed:
        # KILLED (a worker died) is not FAILED: resume goes on from its checkpoint.
        raise click.ClickException(
            f"{len(result.failed)} of {len(result.children)} sweep children did not finish "
            f"({', '.join(f'{c.config.run_name} {c.status}' for c in result.failed)}); "
            f"parent run {result.parent_run_id} ended FAILED; finish them with: "
            f"mnist-mlflow sweep --resume {result.parent_run_id}")
    click.echo(f"sweep {result.parent_run_id}: all {len(result.children)} children finished")
    for call in calls:
        click.echo(f"Round {call['round']}: {call['sentence']}")
    if comparison is not None:
        click.echo()
        print_comparison(comparison)


# The options of `sweep --until-decided` (its parent's params), meaningless without it.
ROUND_OPTIONS = tuple(SEQUENTIAL_PARAMS)


def print_comparison(result: Comparison, top: int = 5) -> None:
    """What `compare` prints: the groups, the rule, the choice, the verdict."""
    from mnist_mlflow import report

    rule = result.rule
    for line in result.skipped:  # runs left out, each named with why
        click.echo(f"Warning: {line}", err=True)
    click.echo(report.headline(rule))
    click.echo()
    click.echo(report.markdown_table(report.summary_table(result)))
    click.echo()
    click.echo(report.markdown_table(report.side_by_side_table(result.groups[:top], rule)))
    click.echo(f"\nRule: {rule.describe()}.")
    click.echo(f"Chosen: {result.chosen_group.label()}: {result.reason}.")
    for line in result.differences:
        click.echo(f"Difference: {line}")
    if result.seeds:
        click.echo(f"Seeds to decide: {result.seeds}")
    for line in result.notes:
        click.echo(f"Note: {line}")
    if result.registered_version:
        click.echo(f"Registered run: {result.chosen.name} ({result.chosen.run_id}) as "
                   f"{result.model_name} version {result.registered_version}")
    for line in report.verdict_lines(result):
        click.echo(line)
    click.echo(f"Report logged to comparison run {result.comparison_run_id}")


@cli.command()
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True,
              help="Experiment whose runs are compared (under `mlflow run`, the run's wins).")
@click.option("--filter", "filter_string", default="",
              help="MLflow filter string, e.g. \"params.epochs = '20'\".")
@click.option("--metric", default=FINAL_VAL_ACC, show_default=True,
              help="Selection metric, averaged over a group's seeds. A test metric (say "
                   "final_test_acc, for runs made with --val-size 0) selects on the test set, "
                   "and the report says so first.")
@click.option("--goal", type=click.Choice(["max", "min"]), default=None,
              help="Whether the metric is maximized [default: min for losses/gaps, else max].")
@click.option("--max-params", type=int, default=8000, show_default=True,
              help="Only groups with at most this many parameters are eligible.")
@click.option("--top", type=int, default=5, show_default=True,
              help="Groups shown side by side and plotted.")
@click.option("--diff", "diffs", nargs=2, multiple=True, metavar="GROUP_A GROUP_B",
              help="Also say whether these two groups (config_group, or the start of one) "
                   "really differ: the difference of means with its 95% Welch interval. "
                   "Repeatable; the top two are always compared.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Also write comparison.md, comparison.png and comparison_pareto.png to this "
                   "folder.")
@click.option("--results", "results_path", type=click.Path(dir_okay=False), default=None,
              help="Also write RESULTS.md here: a table per phase of the experiment's sweeps.")
@click.option("--register/--no-register", default=True, show_default=True,
              help="Register the chosen run's model and consider it for production.")
@click.option("--model-name", default=DEFAULT_MODEL_NAME, show_default=True,
              help="Registered model name.")
@click.option("--min-effect", type=float, default=DEFAULT_MIN_EFFECT, show_default=True,
              metavar="POINTS",
              help="The smallest difference worth acting on: when the verdict is within "
                   "noise, how many seeds would decide one this large is said too.")
@click.option("--force", is_flag=True,
              help="Move `production` even when the challenger's group does not beat "
                   "production's beyond seed and image noise.")
@click.option("--data-dir", default=lambda: os.environ.get("MNIST_DATA_DIR", "data"),
              show_default="data/ or $MNIST_DATA_DIR",
              help="MNIST, to score runs made before per-image records from their logged "
                   "models, and to draw the images on which two models disagree.")
@click.pass_context
def compare(ctx: click.Context, experiment: str, filter_string: str, metric: str,
            goal: str | None, max_params: int, top: int, diffs: tuple[tuple[str, str], ...],
            report_dir: str | None, results_path: str | None, register: bool, model_name: str,
            force: bool, data_dir: str, min_effect: float) -> None:
    """Compare finished runs by group over seeds, pick the production candidate on
    validation, register it, and move `production` only if it is really better."""
    from mnist_mlflow import comparison
    from mnist_mlflow.registry import check_model_name
    from mnist_mlflow.schema import higher_is_better as goal_of
    from mnist_mlflow.selection import SelectionRule
    from mnist_mlflow.store import open_store

    # Every mistake is found before anything is compared, logged or registered.
    check_experiment(experiment)
    check_model_name(model_name)
    if report_dir:
        writable_path(Path(report_dir), "--report")
    if results_path:
        writable_path(Path(results_path), "--results")
    open_store()
    higher_is_better = goal_of(metric) if goal is None else goal == "max"
    rule = SelectionRule(metric, max_params, higher_is_better)
    result = comparison.compare(experiment, filter_string, rule, top,
                                Path(report_dir) if report_dir else None,
                                runner_run_id=runner_run_id(ctx), diffs=diffs,
                                data_dir=data_dir, register=register, model_name=model_name,
                                force=force, min_effect=min_effect)
    print_comparison(result, top)
    if report_dir:
        click.echo(f"Report written to {report_dir}")
    if results_path:
        from mnist_mlflow.results import render_results

        figures = (Path(os.path.relpath(Path(report_dir),
                                        Path(results_path).resolve().parent))
                   if report_dir else None)
        Path(results_path).write_text(render_results(result.experiment, invoked_command(),
                                                     figures, data_dir, result.files))
        click.echo(f"Results by phase written to {results_path}")


@cli.command()
@click.argument("target", metavar="TARGET")
@click.option("--epochs", type=int, default=0,
              help="Reproduce only the first K epochs (a cheap audit) [default: all].")
@click.option("--experiment", default="",
              help="Experiment of the new run [default: the original's].")
@click.option("--at-commit", is_flag=True,
              help="Train the recorded code (its commit, plus its uncommitted patch) in a "
                   "temporary git worktree, with this Python; it trains every epoch.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Run on this device instead of the recorded one (expect other numbers).")
@click.option("--threads", type=int, default=None,
              help="torch threads instead of the recorded count (expect other numbers).")
@click.option("--data-dir", default=lambda: os.environ.get("MNIST_DATA_DIR", "data"),
              show_default="data/ or $MNIST_DATA_DIR", help="Folder holding MNIST/raw.")
def reproduce(target: str, epochs: int, experiment: str, at_commit: bool, device: str | None,
              threads: int | None, data_dir: str) -> None:
    """Retrain TARGET (a run id, models:/NAME@ALIAS or models:/NAME/VERSION) from its
    record into a new run and say whether it is the same: identical, within seed noise, or
    differs (exit 1)."""
    from mnist_mlflow.reproduce import DIFFERS
    from mnist_mlflow.reproduce import reproduce as rerun

    if epochs < 0:
        raise UserError(f"invalid --epochs: must be >= 1, got {epochs}")
    if at_commit and epochs:
        raise UserError("--epochs does not apply with --at-commit: the recorded code trains "
                        "every epoch")
    overrides = {name: value for name, value in (("device", device), ("threads", threads))
                 if value is not None}
    outcome = rerun(target, data_dir, epochs, experiment, at_commit, overrides,
                    say=click.echo)
    for line in outcome.verdict.lines():
        click.echo(line)
    click.echo(f"New run {outcome.run_id} (tag mnist_mlflow.reproduces="
               f"{outcome.target.run.info.run_id})"
               + (f"; {outcome.target.model_name} version {outcome.target.version} tagged "
                  f"reproduced={outcome.verdict.kind}" if outcome.target.version else ""))
    if outcome.verdict.kind == DIFFERS:
        sys.exit(1)


@cli.command()
@click.option("--version", required=True, help="Version to make `production` (rollback).")
@click.option("--model-name", default=DEFAULT_MODEL_NAME, show_default=True)
def promote(version: str, model_name: str) -> None:
    """Point alias `production` at a version; the one that held it becomes `previous`."""
    from mnist_mlflow.registry import promote as move_production

    click.echo(move_production(model_name, version).message)


@cli.command()
@click.option("--stale", is_flag=True,
              help="Only the runs whose process is gone (same host: its pid is not alive; "
                   "another host: no heartbeat for 30 minutes).")
@click.option("--mark-killed", is_flag=True,
              help="End the stale runs KILLED, so that --resume goes on with them.")
def runs(stale: bool, mark_killed: bool) -> None:
    """List the RUNNING runs of every experiment, with the process that trains each."""
    from mnist_mlflow.mlrun import mark_killed as end_killed
    from mnist_mlflow.mlrun import running_runs
    from mnist_mlflow.report import markdown_table
    from mnist_mlflow.store import open_store

    if mark_killed and not stale:
        raise UserError("--mark-killed needs --stale: only runs whose process is gone are ended")
    open_store(writes=mark_killed)
    rows = [["Run", "Name", "Experiment", "Process", "State"]]
    gone = []
    for run, experiment, lease in running_runs():
        dead = lease is not None and not lease.alive
        if stale and not dead:
            continue
        state = "no lease (made before leases, or not ours)" if lease is None else (
            "alive" if lease.alive else "gone: stale")
        rows.append([run.info.run_id, run.info.run_name or "", experiment,
                     lease.describe() if lease else "?", state])
        if dead:
            gone.append((run, lease))
    click.echo(markdown_table(rows) if len(rows) > 1 else
               f"no {'stale ' if stale else ''}RUNNING runs")
    if mark_killed:
        for run, lease in gone:
            end_killed(run, f"process gone ({lease.describe()})")
            click.echo(f"run {run.info.run_id} marked KILLED; resume it with: "
                       f"mnist-mlflow train --resume {run.info.run_id}")


@cli.command()
@click.option("--experiment", default="", metavar="NAME",
              help="Check this experiment's runs and the versions registered from them "
                   "(default: every experiment and every registered model).")
@click.option("--repair", is_flag=True,
              help="Make the safe repairs and say each: stale runs ended KILLED, missing "
                   "records scored again from the run's model, the rest tagged broken so "
                   "that every command leaves it out. Nothing is deleted.")
@click.option("--data-dir", default=lambda: os.environ.get("MNIST_DATA_DIR", "data"),
              show_default="$MNIST_DATA_DIR or data",
              help="MNIST, for scoring missing per-image records again.")
def doctor(experiment: str, repair: bool, data_dir: str) -> None:
    """Check a store: one row per problem, and what --repair does about it.

    Exit 0 when the store is whole, 1 while problems remain."""
    from mnist_mlflow import doctor as checks
    from mnist_mlflow.store import open_store

    open_store(writes=repair)
    checkup = checks.examine(experiment, data_dir)
    if repair and checkup.problems:
        click.echo(checks.describe(checkup))
        for line in checks.repair(checkup):
            click.echo(f"repaired {line}")
        checkup = checks.examine(experiment, data_dir)
        click.echo("After the repairs:")
    click.echo(checks.describe(checkup))
    if not checkup.whole:
        sys.exit(1)


@cli.command()
@click.option("--model-name", default=DEFAULT_MODEL_NAME, show_default=True)
def models(model_name: str) -> None:
    """List the registered versions: aliases, selection metric, source run."""
    from mnist_mlflow.registry import list_versions
    from mnist_mlflow.report import markdown_table

    rows = [["Version", "Aliases", "Run's metric", "Group judged (95% CI); verdict",
             "Reproduced", "Run name", "Run", "Registered"]]
    versions = list_versions(model_name)
    rows += [[v.version, ", ".join(v.aliases), v.metric, v.judged, v.reproduced, v.run_name,
              v.run_id, v.created] for v in versions]
    click.echo(markdown_table(rows))
    for v in versions:
        if v.broken:
            held = f" ({', '.join(v.aliases)})" if v.aliases else ""
            click.echo(f"Note: version {v.version}{held} is broken: {v.broken}; "
                       "`mnist-mlflow doctor` says what to do")


@cli.command()
@click.option("--model-uri", default="models:/mnist-cnn@production", show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per input on stdout: file and digit and probability, or "
                   "file and error.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
def predict(model_uri: str, as_json: bool, images: tuple[str, ...]) -> None:
    """Print the digit and its probability for each image (PNG, JPEG, ...), framed as MNIST's
    digits were (docs/serving.md). A directory stands for the image files in it. Each input
    gets its own line, an error naming what is wrong if it cannot be read; the exit code is 1
    if any failed."""
    import json

    from mnist_mlflow.framing import expand_inputs
    from mnist_mlflow.predict import load_model, predict_files

    results = predict_files(load_model(model_uri), expand_inputs([Path(p) for p in images]))
    for result in results:
        if as_json:
            click.echo(json.dumps(result.as_json()))
        elif result.error:
            click.echo(f"Error: {result.error}", err=True)
        else:
            click.echo(f"{result.path}: {result.digit} (p={result.probability:.3f})")
    failed = sum(1 for r in results if r.error)
    if failed:
        raise click.ClickException(f"{failed} of {len(results)} files could not be predicted")


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, no traceback."""
    signal.signal(signal.SIGTERM, raise_terminated)
    # MLflow draws a progress bar for every model it downloads (predict, the registry's load
    # check): on a remote server, a screenful of bars before the one line that matters.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as abort:
        # Click turns KeyboardInterrupt (so SIGTERM's Terminated too) into Abort; report the cause.
        _interrupted(abort.__cause__ if isinstance(abort.__cause__, KeyboardInterrupt)
                     else KeyboardInterrupt())
    except click.ClickException as err:
        click.echo(f"Error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except UserError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    except TrainingDiverged as err:
        click.echo(f"Error: training diverged: {err}", err=True)
        sys.exit(1)
    except (DiskFull, ServerAway) as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as err:
        _interrupted(err)
    except PermissionError as err:
        # A folder the artifacts go to that cannot be written (an immutable or read-only
        # folder, another user's): one line naming it; the runs it touched ended first.
        click.echo(f"Error: {err.strerror or err}: {err.filename or ''} cannot be written",
                   err=True)
        sys.exit(1)
    except Exception as err:
        # The tracking store refusing a write (read-only, full, damaged) or a server error:
        # one line naming the store, not MLflow's and SQLAlchemy's tracebacks. Runs being
        # trained have already ended FAILED with the whole reason.
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(err, (MlflowException, SQLAlchemyError)):
            raise
        import mlflow

        from mnist_mlflow.store import store_error

        click.echo(f"Error: tracking store {mlflow.get_tracking_uri()}: {store_error(err)}",
                   err=True)
        sys.exit(1)


def _interrupted(err: KeyboardInterrupt) -> None:
    """One line on stderr, then exit 130 (SIGINT) or 143 (SIGTERM)."""
    # A RunInterrupted says which run stopped and the command that resumes it.
    message = f"{err}" if hasattr(err, "run_id") else (
        f"({str(err) or 'SIGINT'}); no run was being trained at that moment, so none was "
        "left running")
    click.echo(f"Interrupted {message}", err=True)
    sys.exit(getattr(err, "exit_code", 130))
