"""`--threads auto` against torch's default threads, idle and beside one busy process.

In one process: the seed's net (`opt`, fast pipeline, CPU) trains one pass over `--images`
examples, scaled to a 60,000-image epoch, with threads 0 (torch's default:
every core) and with `auto`, the two interleaved `--repeats` times and the fastest kept;
first on an idle machine, then beside one CPU-bound process (a Python busy loop, as a
laptop's other work). `auto` counts the free cores when it resolves, as a run does when it
starts. Targets: beside a busy process `auto` at least 1.8x
faster than the default; idle no slower than 1.05x of it.

    python benchmarks/threads_auto.py --images 25600 --repeats 3      # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_speed import seconds_per_epoch  # noqa: E402

from mnist_mlflow.config import TrainConfig  # noqa: E402
from mnist_mlflow.runtime import resolve, torch_threads  # noqa: E402

BUSY_LOOP = "while True: pass"


@contextmanager
def busy_process(busy: bool) -> Iterator[None]:
    """One CPU-bound process beside the block (none when not `busy`)."""
    if not busy:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    time.sleep(1.0)  # running, and counted by /proc/stat, before the run resolves
    try:
        yield
    finally:
        process.kill()
        process.wait()


def epoch_seconds(threads: str, data_dir: str, images: int, repeat: int) -> tuple[float, str]:
    """Seconds per 60,000-image epoch with `threads` resolved as a run resolves it; why."""
    config = TrainConfig(device="cpu", threads=threads, epochs=1).validate()
    runtime = resolve(config)
    with torch_threads(runtime.threads):
        found = seconds_per_epoch(config, data_dir, images, repeat)[0]
    return found, runtime.threads_reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "data"))
    args = parser.parse_args()
    print(f"{os.cpu_count()} cpus; opt, fast pipeline, CPU; {args.images} images x "
          f"{args.repeats} repeats, s per 60k-image epoch")
    seconds: dict[tuple[str, str], float] = {}
    for place in ("idle", "busy"):
        with busy_process(place == "busy"):
            # Interleaved, the fastest kept: the machine's drift falls on both alike.
            for repeat in range(args.repeats):
                for threads in ("0", "auto"):
                    found, why = epoch_seconds(threads, args.data_dir, args.images, repeat)
                    seconds[place, threads] = min(found, seconds.get((place, threads), found))
                    print(f"{place:5} threads {threads:5} {found:6.2f} s   ({why})")
    for (place, threads), found in seconds.items():
        print(f"fastest: {place:5} threads {threads:5} {found:6.2f} s")
    busy_gain = seconds["busy", "0"] / seconds["busy", "auto"]
    idle_cost = seconds["idle", "auto"] / seconds["idle", "0"]
    print(f"beside a busy process: auto {busy_gain:.2f}x faster than the default "
          f"(target >= 1.8x)")
    print(f"idle: auto takes {idle_cost:.3f}x the default's time (target <= 1.05x)")


if __name__ == "__main__":
    main()
