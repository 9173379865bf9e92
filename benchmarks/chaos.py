"""Chaos: a team sweep on Ray against the Team setup server, with failures at random moments.

    python benchmarks/chaos.py --postgres postgresql://USER:PASSWORD@127.0.0.1/postgres \
        --data-dir data [--chaos-seeds 1,2,3] [--children 20]

For each chaos seed: the Team setup server (docs/team-setup.md) (PostgreSQL backend store and
basic-auth users in new databases, proxied artifacts on a tmpfs of their own, so that the
disk can fill) on 127.0.0.1, a registered `mnist-cnn@production`, then `mnist-mlflow sweep
--executor ray` of `--children` children (two variants over seeds) as the admin user. At
moments drawn from the seed it injects: `kill -9` of Ray workers while they train, `kill -9`
of the sweep's driver, a server restart, a full artifact disk for a while, and losses as a
cleanup job makes them: a finished child's artifacts deleted, and another's logged model.
Whenever the driver has ended (killed, or with children FAILED), `sweep --resume` starts
again, until the sweep finishes or `--max-rounds`. Then `compare` and `doctor` run as a user
would, and it audits the store: children FINISHED, epochs logged once each (none missing,
none twice, for every per-epoch metric), runs left RUNNING, checkpoints that do not load,
drivers that printed a traceback, whether `compare` ended with a production model, and
whether `doctor` named every run whose files were deleted.

Target: 20 of 20 children FINISHED, 0 epochs lost or doubled, 0 RUNNING, a production
model after `compare`, and every loss named by `doctor`, over 3 chaos seeds. Mounting the
tmpfs needs root.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import requests
import torch
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fill, free_port, team_auth_config, team_server_env  # noqa: E402

from mnist_mlflow.schema import (  # noqa: E402
    EPOCH_METRICS,
    ROLE_TAG,
    checkpoint_epoch,
    config_from_params,
    settings_of,
)

ADMIN_PASSWORD = "chaos-admin-password-1234"
MODEL = "mnist-cnn"
KINDS = ("kill -9 a Ray worker", "kill -9 the driver", "server restart", "artifact disk full",
         "delete a child's artifacts", "delete a logged model")


@dataclass
class Server:
    """The Team setup server: (re)started on the same port, databases and artifact disk."""

    folder: Path
    store: str
    auth_store: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.folder / "basic_auth.ini"
        config.write_text(team_auth_config(self.auth_store))
        env = {**os.environ, **team_server_env(), "MLFLOW_FLASK_SERVER_SECRET_KEY": "chaos-secret",
               "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
               "MLFLOW_AUTH_CONFIG_PATH": str(config)}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                     "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store,
             "--artifacts-destination", str(self.folder / "artifacts"), "--serve-artifacts",
             "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "2"],
            env=env, cwd=self.folder, stdout=(self.folder / "server.log").open("a"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.folder / "server.log").read_text()
                sys.exit(f"mlflow server exited:\n{log[-3000:]}")
            try:
                requests.get(f"{self.uri}/health", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.5)
        sys.exit("mlflow server did not answer in 180 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)


def new_database(postgres: str) -> str:
    name = f"mnist_mlflow_chaos_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return postgres.rsplit("/", 1)[0] + f"/{name}"


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"cannot mount a tmpfs at {folder} ({done.stderr.strip()}): run as root")


def ray_workers() -> list[int]:
    """Ray worker processes running one of our tasks (their title is `ray::<function>`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::train_in_worker"):
                found.append(int(entry.name))
    return found


def cli(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "mnist_mlflow", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def schedule(rng: random.Random, window: float, worker_kills: int) -> list[tuple[float, str]]:
    """(seconds after the sweep began, kind) of each failure, in time order."""
    events = [(rng.uniform(5, window), KINDS[0]) for _ in range(worker_kills)]
    events += [(rng.uniform(5, window), kind) for kind in KINDS[1:]]
    return sorted(events)


def production_model(env: dict[str, str], data_dir: str, folder: Path) -> dict[str, str]:
    """A tiny trained run registered as mnist-cnn@production; the aliases."""
    done = subprocess.run([sys.executable, "-m", "mnist_mlflow", "train", "--epochs", "1",
                           "--train-limit", "512", "--test-limit", "256", "--val-size", "256",
                           "--device", "cpu", "--threads", "1", "--data-dir", data_dir,
                           "--experiment", "chaos-production"], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"setup training failed:\n{done.stderr[-3000:]}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("chaos-production")
    [run] = client.search_runs([experiment.experiment_id])
    import mlflow

    [model] = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id],
                                          output_format="list")
    version = mlflow.register_model(f"models:/{model.model_id}", MODEL).version
    client.set_registered_model_alias(MODEL, "production", version)
    return dict(client.get_registered_model(MODEL).aliases)


@dataclass
class Audit:
    children: int = 0
    finished: int = 0
    lost: int = 0
    doubled: int = 0
    running: int = 0
    replaced: int = 0  # children trained again as a new run (their first record kept)
    unreadable: int = 0
    aliases_moved: bool = False
    lost_files: int = 0  # runs whose files a fault deleted
    compare_exit: int = -1
    production: str = ""  # the version `production` is on after `compare`
    named: int = 0  # of those runs, how many `doctor` named
    doctor_after_repair: int = -1  # doctor's exit after `doctor --repair`


def after_losses(result: Audit, experiment: str, env: dict[str, str], data_dir: str,
                 folder: Path, lost: set[str]) -> None:
    """`compare` then `doctor` (and `doctor --repair`, then `doctor`) as a user runs them."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "mnist_mlflow", *args], env=env,
                              capture_output=True, text=True, check=False)
        with (folder / f"{args[0]}.log").open("a") as log:
            log.write(done.stdout + done.stderr)
        return done

    result.compare_exit = run("compare", "--experiment", experiment, "--data-dir",
                              data_dir).returncode
    result.production = MlflowClient().get_registered_model(MODEL).aliases.get(
        "production", "")
    checked = run("doctor", "--experiment", experiment, "--data-dir", data_dir)
    rows = [line for line in checked.stdout.splitlines() if line.startswith("| ")]
    result.named = sum(any(run_id in row for row in rows) for run_id in lost)
    run("doctor", "--experiment", experiment, "--repair", "--data-dir", data_dir)
    result.doctor_after_repair = run("doctor", "--experiment", experiment, "--data-dir",
                                     data_dir).returncode


def audit(experiment: str, epochs: int, aliases: dict[str, str], folder: Path) -> Audit:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000)
    result = Audit()
    result.running = sum(r.info.status == "RUNNING" for r in runs)
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "train"]
    # A child trained again as a new run (its first never began) replaces it: count the
    # latest run of each configuration, as `sweep --resume` does.
    # (What it learns, as `sweep --resume` matches them.)
    latest: dict[object, object] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):
        latest[config_from_params(run.info.run_id, settings_of(run), {}).what_it_learns()] = run
    result.children = len(latest)
    result.replaced = len(children) - len(latest)
    for run in latest.values():
        run_id = run.info.run_id
        result.finished += run.info.status == "FINISHED"
        for name in EPOCH_METRICS:
            steps = Counter(m.step for m in client.get_metric_history(run_id, name))
            result.lost += sum(1 for epoch in range(1, epochs + 1) if epoch not in steps)
            result.doubled += sum(count - 1 for count in steps.values())
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            for artifact in client.list_artifacts(run_id, "checkpoints"):
                if checkpoint_epoch(artifact.path) is None:
                    continue
                try:
                    torch.load(client.download_artifacts(run_id, artifact.path, tmp),
                               weights_only=True)
                except Exception:  # noqa: BLE001 - counted
                    result.unreadable += 1
    result.aliases_moved = dict(client.get_registered_model(MODEL).aliases) != aliases
    return result


def one_seed(args: argparse.Namespace, chaos_seed: int) -> tuple[Counter[str], Audit, int, int,
                                                                   float]:
    rng = random.Random(chaos_seed)
    folder = Path(tempfile.mkdtemp(prefix=f"chaos-{chaos_seed}-"))
    mount_tmpfs(folder / "artifacts", "512m")
    server = Server(folder, new_database(args.postgres), new_database(args.postgres))
    server.start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD, "OMP_NUM_THREADS": "1"}
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                           "MLFLOW_TRACKING_PASSWORD")})
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    injected: Counter[str] = Counter()
    lost: set[str] = set()  # runs whose files a fault deleted
    rounds = tracebacks = 0
    disk_freed_at = 0.0
    filler: Path | None = None
    try:
        aliases = production_model(env, args.data_dir, folder)
        experiment = f"chaos-{chaos_seed}"
        seeds = ",".join(str(s) for s in range(1, args.children // 2 + 1))
        sweep = ["sweep", "--executor", "ray", "--variant", "opt:0,opt:0.05", "--seeds", seeds,
                 "--epochs", str(args.epochs), "--train-limit", str(args.train_limit),
                 "--test-limit", "256", "--val-size", "256", "--device", "cpu",
                 "--data-dir", args.data_dir, "--experiment", experiment]
        events = schedule(rng, args.window, args.worker_kills)
        print(f"chaos seed {chaos_seed}: " + "; ".join(f"{t:.0f}s {k}" for t, k in events),
              flush=True)
        began = time.monotonic()
        parent_id = ""
        driver: subprocess.Popen[bytes] | None = None
        while True:
            now = time.monotonic() - began
            if filler is not None and now >= disk_freed_at:
                filler.unlink()
                filler = None
            parent_id = parent_id or sweep_parent(experiment)
            if driver is None or driver.poll() is not None:
                if driver is not None:
                    log = (folder / f"round-{rounds}.log").read_text(errors="replace")
                    tracebacks += "Traceback" in log
                    if driver.returncode == 0:
                        break
                if rounds >= args.max_rounds:
                    print(f"chaos seed {chaos_seed}: not finished after {rounds} rounds",
                          flush=True)
                    break
                if filler is not None:  # resume once the disk has room again
                    time.sleep(0.5)
                    continue
                rounds += 1
                command = sweep if not parent_id else ["sweep", "--resume", parent_id,
                                                       "--executor", "ray", "--data-dir",
                                                       args.data_dir]
                driver = cli(*command, env=env, log=folder / f"round-{rounds}.log")
            if events and now >= events[0][0]:
                kind = events[0][1]
                # A driver killed before it made the parent would leave nothing to resume.
                if (parent_id or kind != KINDS[1]) and apply(kind, driver, server, injected, rng,
                                                             experiment, lost):
                    events.pop(0)
                    if kind == KINDS[3]:
                        filler = fill(folder / "artifacts")
                        disk_freed_at = now + rng.uniform(10, 30)
                else:
                    events[0] = (now + 1.0, kind)  # nothing to hit yet: a moment later
            time.sleep(0.5)
        if driver is not None and driver.poll() is None:
            driver.kill()
        if filler is not None:
            filler.unlink()
        wall = time.monotonic() - began
        result = audit(experiment, args.epochs, aliases, folder)
        result.lost_files = len(lost)
        after_losses(result, experiment, env, args.data_dir, folder, lost)
        result_tracebacks = tracebacks
    finally:
        server.stop()
        subprocess.run(["umount", "--lazy", str(folder / "artifacts")], check=False)
    return injected, result, rounds, result_tracebacks, wall


def sweep_parent(experiment: str) -> str:
    """The parent run of the experiment's sweep, once it exists."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return ""
    parents = [r for r in client.search_runs([found.experiment_id])
               if r.data.tags.get(ROLE_TAG) == "sweep"]
    return parents[0].info.run_id if parents else ""


def finished_children(experiment: str) -> list:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [r for r in client.search_runs([found.experiment_id], "attributes.status = "
                                          "'FINISHED'") if r.data.tags.get(ROLE_TAG) == "train"]


def on_disk(server: Server, uri: str) -> Path:
    """Where the server keeps the proxied artifacts at `uri` (mlflow-artifacts:/...)."""
    return server.folder / "artifacts" / uri.split(":", 1)[1].lstrip("/")


def delete_files(kind: str, server: Server, experiment: str, rng: random.Random,
                 lost: set[str]) -> bool:
    """A cleanup job's doing: a finished child's artifacts, or its logged model, deleted."""
    candidates = [r for r in finished_children(experiment) if r.info.run_id not in lost]
    if not candidates:
        return False
    run = rng.choice(candidates)
    if kind == KINDS[4]:
        shutil.rmtree(on_disk(server, run.info.artifact_uri), ignore_errors=True)
    else:
        import mlflow

        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id], output_format="list",
            filter_string=f"source_run_id = '{run.info.run_id}'")
        if not models:
            return False
        shutil.rmtree(on_disk(server, models[0].artifact_location), ignore_errors=True)
    lost.add(run.info.run_id)
    return True


def apply(kind: str, driver: subprocess.Popen[bytes] | None, server: Server,
          injected: Counter[str], rng: random.Random, experiment: str, lost: set[str]) -> bool:
    """Inject one failure of `kind` now; False when there is nothing for it to hit yet."""
    if kind in KINDS[4:]:
        if not delete_files(kind, server, experiment, rng, lost):
            return False
        injected[kind] += 1
        return True
    if kind == KINDS[0]:
        workers = ray_workers()
        if not workers:
            return False
        os.kill(rng.choice(workers), signal.SIGKILL)
    elif kind == KINDS[1]:
        if driver is None or driver.poll() is not None:
            return False
        driver.send_signal(signal.SIGKILL)
    elif kind == KINDS[2]:
        server.stop()
        time.sleep(2)
        server.start()
    injected[kind] += 1
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", required=True,
                        help="a PostgreSQL role that may create databases")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--chaos-seeds", default="1,2,3")
    parser.add_argument("--children", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=2048)
    parser.add_argument("--worker-kills", type=int, default=2)
    parser.add_argument("--window", type=float, default=90.0,
                        help="failures fall within this many seconds of the sweep's start")
    parser.add_argument("--max-rounds", type=int, default=12)
    args = parser.parse_args()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # the audit downloads many
    rows = []
    for chaos_seed in (int(s) for s in args.chaos_seeds.split(",")):
        injected, result, rounds, tracebacks, wall = one_seed(args, chaos_seed)
        rows.append((chaos_seed, injected, result, rounds, tracebacks, wall))
        print(f"chaos seed {chaos_seed}: injected "
              + ", ".join(f"{injected[k]} {k}" for k in KINDS)
              + f"; {rounds} rounds, {wall:.0f} s; children FINISHED {result.finished} of "
              f"{result.children}; epochs lost {result.lost}, doubled {result.doubled}; "
              f"RUNNING {result.running}; children retrained as new runs "
              f"{result.replaced}; checkpoints unreadable {result.unreadable}; "
              f"aliases moved {'yes' if result.aliases_moved else 'no'}; drivers with a "
              f"traceback {tracebacks}; runs with files deleted {result.lost_files}, named by "
              f"doctor {result.named}; compare exit {result.compare_exit}, production "
              f"version {result.production or 'none'}; doctor after --repair exit "
              f"{result.doctor_after_repair}", flush=True)
    print("\n| chaos seed | worker kills | driver kills | server restarts | disk full "
          "| rounds | wall s | children FINISHED | epochs lost / doubled | RUNNING "
          "| retrained as new runs | checkpoints unreadable | tracebacks "
          "| runs with files deleted | named by doctor | compare exit, production "
          "| doctor after --repair |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for chaos_seed, injected, result, rounds, tracebacks, wall in rows:
        print(f"| {chaos_seed} | {injected[KINDS[0]]} | {injected[KINDS[1]]} | "
              f"{injected[KINDS[2]]} | {injected[KINDS[3]]} | {rounds} | {wall:.0f} | "
              f"{result.finished} of {result.children} | {result.lost} / {result.doubled} | "
              f"{result.running} | {result.replaced} | {result.unreadable} | {tracebacks} | "
              f"{result.lost_files} | {result.named} | {result.compare_exit}, "
              f"v{result.production or ' none'} | exit {result.doctor_after_repair} |")
    met = all(r.finished == r.children == args.children and not (r.lost or r.doubled or
              r.running) and r.compare_exit == 0 and r.production and r.named == r.lost_files
              and r.doctor_after_repair == 0 for _, _, r, _, _, _ in rows)
    print(f"\ntarget ({args.children} of {args.children} FINISHED, 0 epochs lost or doubled, "
          f"0 RUNNING, compare ends with a production model, doctor names every run whose "
          f"files were deleted and exits 0 after --repair, every chaos seed): "
          f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
