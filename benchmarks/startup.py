"""Start-up time of the commands that do not train, against importing torch and mlflow.

`compare --help` and `models` import no torch, so they should cost no more than importing
torch and mlflow does (targets: `--help` at most 0.5x, `models` at most 1.0x). Each command is
a fresh process, run `--repeats` times in this one run; the median is reported.

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"compare --help": 0.5, "models": 1.0}


def seconds(command: list[str], env: dict[str, str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cli = Path(sys.executable).with_name("mnist-mlflow")
    with tempfile.TemporaryDirectory() as tmp:
        # A store with one registered model, so that `models` lists something.
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        subprocess.run([sys.executable, "-c", "from mlflow import MlflowClient; "
                        "MlflowClient().create_registered_model('mnist-cnn')"],
                       env=env, cwd=tmp, check=True, capture_output=True)
        commands = {
            "import torch, mlflow": [sys.executable, "-c", "import torch, mlflow"],
            "compare --help": [str(cli), "compare", "--help"],
            "models": [str(cli), "models"],
        }
        times = {name: [] for name in commands}
        for _ in range(args.repeats):  # interleaved, so that drift hits all alike
            for name, command in commands.items():
                times[name].append(seconds(command, env, tmp))
    base = statistics.median(times["import torch, mlflow"])
    print(f"{args.repeats} runs each, median seconds ({os.cpu_count()} cpus):")
    for name, values in times.items():
        median = statistics.median(values)
        target = f"  target <= {TARGETS[name]:.1f}x" if name in TARGETS else ""
        print(f"  {name:22s} {median:6.2f} s  {median / base:5.2f}x{target}")


if __name__ == "__main__":
    main()
