"""How a TrainConfig runs on this machine: device, precision, compile, layout, determinism.

Settled once, before anything is built, from what the machine answers (CUDA present, its
compute capability, a Triton toolchain). Each choice made for 'auto' carries its reason, which
the run records, so a run that trained eager or in fp32 says why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_mlflow.config import AUTO_THREADS, TrainConfig, UserError
from mnist_mlflow.schema import (
    CHANNELS_LAST_TAG,
    COMPILE_REASON_TAG,
    COMPILED_TAG,
    DEVICE_TAG,
    PRECISION_REASON_TAG,
    PRECISION_TAG,
    THREADS_REASON_TAG,
)

# Inductor's Triton kernels need Volta or newer; bf16 tensor cores need Ampere or newer.
# Below these, torch still "supports" both by emulation, slowly.
MIN_TRITON_CAPABILITY = (7, 0)
MIN_BF16_CAPABILITY = (8, 0)
# cuBLAS is deterministic only with a fixed workspace (set before its first call).
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


# The share of the machine a sweep gives a child (a local worker's, a Ray task's): the threads
# `--threads auto` takes there, and why. Counting free cores in each child would race:
# children starting together each see the others' cores as free.
Share = tuple[int, str]


@dataclass(frozen=True)
class Runtime:
    """The resolved settings of one training on this machine, with why 'auto' chose them."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    channels_last: bool
    deterministic: bool
    compile_reason: str
    precision_reason: str
    threads: int  # torch's intra-op threads for training; 0 leaves torch's own choice
    threads_reason: str

    @property
    def cuda_graphs(self) -> bool:
        """Compiled CUDA training replays CUDA graphs (mode 'reduce-overhead')."""
        return self.compile and self.device.type == "cuda"

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def describe(self) -> str:
        """Like `cuda, bf16, compiled, channels_last`: what the log and the run say."""
        parts = [str(self.device), self.precision, "compiled" if self.compile else "eager"]
        parts += ["channels_last"] if self.channels_last else []
        parts += ["deterministic"] if self.deterministic else []
        return ", ".join(parts)

    def tags(self) -> dict[str, str]:
        """What the run records of how it ran (tags: a resumed run may run otherwise)."""
        return {DEVICE_TAG: str(self.device), PRECISION_TAG: self.precision,
                COMPILED_TAG: str(self.compile).lower(),
                CHANNELS_LAST_TAG: str(self.channels_last).lower(),
                COMPILE_REASON_TAG: self.compile_reason,
                PRECISION_REASON_TAG: self.precision_reason,
                THREADS_REASON_TAG: self.threads_reason}


def capability(device: torch.device) -> tuple[int, int]:
    """The CUDA compute capability of `device`, like (8, 0) for an A100."""
    return torch.cuda.get_device_capability(device)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def c_compiler() -> str | None:
    """The C compiler Triton would build its launchers with ($CC, else gcc, else clang)."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return shutil.which("gcc") or shutil.which("clang")


def python_headers() -> bool:
    """Whether Python.h is there: Triton compiles a C extension against it."""
    return (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


def cannot_compile(device: torch.device) -> str:
    """Why torch.compile with Inductor cannot work on `device`; empty when it can."""
    if device.type != "cuda":
        return ""  # Inductor's C++ backend: a missing compiler fails fast, and falls back
    if capability(device) < MIN_TRITON_CAPABILITY:
        major, minor = capability(device)
        return f"compute capability {major}.{minor} is below Triton's 7.0"
    if not triton_installed():
        return "Triton is not installed"
    if c_compiler() is None:
        return "no C compiler (set CC, or install gcc or clang)"
    if not python_headers():
        return "Python.h is missing (install the python3-dev package of this Python)"
    return ""


def resolve_device(config: TrainConfig) -> torch.device:
    """CUDA for 'auto' when present, else the CPU; UserError for 'cuda' without CUDA."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("invalid device: 'cuda' was asked for but CUDA is not available here")
    return torch.device(config.device)


def _precision(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, str]:
    if config.precision != "auto":
        dtype = torch.bfloat16 if config.precision == "bf16" else None
        return dtype, f"--precision {config.precision}"
    if device.type != "cuda":
        # This CPU has AVX512-BF16 but no AMX: bf16 autocast measured slower than fp32.
        return None, "auto: fp32 on the CPU"
    if capability(device) < MIN_BF16_CAPABILITY:
        # torch.cuda.is_bf16_supported() says True here too, through slow emulation.
        major, minor = capability(device)
        return None, f"auto: fp32, compute capability {major}.{minor} has no native bf16"
    return torch.bfloat16, "auto: bf16 on a GPU with native bf16"


def _compile(config: TrainConfig, device: torch.device) -> tuple[bool, str]:
    if config.compile == "off":
        return False, "--compile off"
    if config.compile == "on":
        return True, "--compile on"
    if device.type != "cuda":
        # A first compile costs ~35 s here and needs a C++ compiler at run time; a 20-epoch
        # run only breaks even (263.9 s eager, 266.6 s cold, 233.0 s warm: benchmarks/README.md).
        return False, "auto: eager on the CPU"
    if config.deterministic:
        return False, "auto: eager, --deterministic (Inductor's kernels are not checked for it)"
    missing = cannot_compile(device)
    if missing:
        return False, f"auto: eager, {missing}"
    return True, "auto: compiled with CUDA graphs"


def resolve(config: TrainConfig, share: Share | None = None) -> Runtime:
    """How `config` runs here; UserError when it asks for what this machine lacks."""
    device = resolve_device(config)
    dtype, precision_reason = _precision(config, device)
    compiles, compile_reason = _compile(config, device)
    # cuDNN's fastest kernels (and bf16 tensor cores) want NHWC. On the CPU oneDNN's NHWC
    # convolutions skip the reorders that NCHW needs, but eager BatchNorm and pooling in NHWC
    # made the step 1.8x slower here; compiled, those are fused.
    channels_last = device.type == "cuda" or compiles
    threads, threads_reason = resolve_threads(config.threads, share)
    return Runtime(device, dtype, compiles, channels_last, config.deterministic,
                   compile_reason, precision_reason, threads, threads_reason)


def busy_cores(window_s: float = 0.25) -> float:
    """How many of the machine's cores other processes keep busy now: from /proc/stat over
    `window_s` (this process sleeps meanwhile), else the 1-minute load average."""
    def times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # all but guest time; idle + iowait
    try:
        total, idle = times()
        time.sleep(window_s)
        total2, idle2 = times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    elapsed = total2 - total
    return (elapsed - (idle2 - idle)) / elapsed * (os.cpu_count() or 1) if elapsed else 0.0


def auto_threads(cores: int, busy: float) -> int:
    """Threads for a run given the cores it may use and how many are busy: the free ones,
    at least 1. OpenMP threads wait on each other at every step: one on a busy core holds
    back the rest (an epoch 4.3x slower beside one busy process, on 2 cores)."""
    return max(1, min(cores, cores - round(busy)))


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def omp_limit() -> int:
    """OMP_NUM_THREADS when the user (or a scheduler) set it to a count, else 0."""
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return int(limit) if limit.isdigit() else 0


def resolve_threads(threads: str, share: Share | None = None) -> tuple[int, str]:
    """torch's thread count for TrainConfig.threads, with why; `share`: what a sweep gave."""
    if threads == AUTO_THREADS:
        if omp_limit():  # the user's (or a scheduler's) word stands
            return omp_limit(), f"auto: OMP_NUM_THREADS={omp_limit()}"
        if share is not None:
            return share
        cores = usable_cores()
        busy = busy_cores()
        count = auto_threads(cores, busy)
        return count, f"auto: {count} of {cores} cores free ({busy:.1f} busy at the start)"
    if threads == "0":
        return 0, "--threads 0: torch's default"
    return int(threads), f"--threads {threads}"


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch's deterministic mode for the block (an op without one raises), then as it was."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    was = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.backends.cudnn.benchmark = benchmark


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (0: unchanged), then restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls without TF32 for the block, then as they were.

    cuDNN convolutions default to TF32 on Ampere and newer; evaluation must compute what the
    served CPU model computes, so that logged and served accuracy agree.
    """
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
