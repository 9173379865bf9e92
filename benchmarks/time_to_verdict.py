"""Wall time from an empty store to `compare`'s dropout verdict, for three ways of running a
sweep, idle and beside one busy process.

Each leg is what a user types, in subprocesses, into a new SQLite store: `mnist-mlflow sweep
--phase seed --seeds 1..S` (opt with and without dropout 0.05), then `mnist-mlflow compare
--diff opt-dropout0.05 opt-dropout0 --no-register`, whose verdict line is printed.

- baseline: children one after another in one process (`--workers 1`), torch's default
  threads (`--threads 0`) and nn.Dropout's own mask: a sweep without what makes it fast.
- defaults: children side by side (`--workers auto`), `--threads auto`, the cheaper
  dropout mask.
- sequential: the defaults but `--workers 1`: what side-by-side children alone gain
  (defaults / sequential).

Busy: one Python busy loop runs beside the leg (a laptop's other work). Targets: defaults /
baseline <= 0.5 busy and <= 0.9 idle; defaults / sequential <= 1.0 idle and <= 0.6 busy.

    python benchmarks/time_to_verdict.py                       # full scale: hours
    python benchmarks/time_to_verdict.py --train-limit 12800 --epochs 3 --test-limit 2000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from threads_auto import busy_process  # noqa: E402

from mnist_mlflow.config import TrainConfig  # noqa: E402

# The baseline leg trains with nn.Dropout's own mask: the CLI with the cheaper mask undone.
BASELINE_DROPOUT = ("import torch.nn, mnist_mlflow.models as m; "
                  "m.Dropout.forward = torch.nn.Dropout.forward; "
                  "from mnist_mlflow.cli import main; main()")
LEGS = {
    "baseline": (BASELINE_DROPOUT, ["--workers", "1", "--threads", "0"]),
    "defaults": ("from mnist_mlflow.cli import main; main()", []),
    "sequential": ("from mnist_mlflow.cli import main; main()", ["--workers", "1"]),
}


def verdict_seconds(leg: str, args: argparse.Namespace) -> tuple[float, str]:
    """Seconds from an empty store to compare's verdict for `leg`; the verdict line."""
    launcher, extra = LEGS[leg]
    sizes = ["--epochs", str(args.epochs), "--train-limit", str(args.train_limit),
             "--test-limit", str(args.test_limit)]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("MLFLOW_RUN_ID", None)
        env.pop("OMP_NUM_THREADS", None)  # auto must count the cores itself
        command = [sys.executable, "-c", launcher]
        start = time.perf_counter()
        subprocess.run([*command, "sweep", "--phase", "seed", "--seeds", args.seeds, *sizes,
                        *extra, "--data-dir", args.data_dir, "--experiment", "verdict"],
                       env=env, check=True, capture_output=True, text=True)
        groups = [TrainConfig(dropout=dropout, epochs=args.epochs, train_limit=args.train_limit,
                              test_limit=args.test_limit).config_group for dropout in (0.05, 0)]
        compared = subprocess.run(
            [*command, "compare", "--experiment", "verdict", "--no-register", "--diff",
             *groups, "--data-dir", args.data_dir],
            env=env, capture_output=True, text=True)
        if compared.returncode:
            raise SystemExit(f"{leg}: compare failed: {compared.stderr.strip()[-500:]}")
        elapsed = time.perf_counter() - start
    lines = [line.strip() for line in compared.stdout.splitlines()
             if line.startswith("Difference: dropout 0.05 vs 0, final_val_acc")]
    return elapsed, (lines[0] if lines else compared.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-limit", type=int, default=0, help="0: all training images")
    parser.add_argument("--test-limit", type=int, default=0, help="0: all 10,000")
    parser.add_argument("--legs", default="baseline,defaults,sequential")
    parser.add_argument("--conditions", default="idle,busy")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "data"))
    args = parser.parse_args()
    legs = args.legs.split(",")
    print(f"{os.cpu_count()} cpus; seeds {args.seeds}, {args.epochs} epochs, train_limit "
          f"{args.train_limit or 'all'}, test_limit {args.test_limit or 'all'}; legs {legs}")
    for condition in args.conditions.split(","):
        seconds = {}
        with busy_process(condition == "busy"):
            for leg in legs:
                seconds[leg], verdict = verdict_seconds(leg, args)
                print(f"{condition:<5} {leg:<11} {seconds[leg]:8.1f} s   {verdict}", flush=True)
        for leg, reference in (("defaults", "baseline"), ("defaults", "sequential")):
            if leg in seconds and reference in seconds:
                print(f"{condition:<5} {leg} / {reference}: "
                      f"{seconds[leg] / seconds[reference]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
