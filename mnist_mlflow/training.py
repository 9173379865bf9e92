"""The training loop. Knows nothing of MLflow: it returns plain numbers per epoch.

The whole state of a run (model, optimizer, scheduler, completed epochs) is one explicit
object; data order, augmentation and dropout of epoch `e` are derived from (seed, e), so
training can stop after any epoch and go on later exactly as if it had not stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mnist_mlflow.config import TrainConfig, TrainingDiverged
from mnist_mlflow.data import Batch, Pipeline, epoch_seed
from mnist_mlflow.models import build_model
from mnist_mlflow.runtime import Runtime, deterministic_algorithms, torch_threads, true_fp32
from mnist_mlflow.schema import (
    EPOCH_METRICS,
    EPOCH_SECONDS,
    LR,
    TEST_ACC,
    TEST_LOSS,
    TRAIN_ACC,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    rounded,
)

log = logging.getLogger("mnist_mlflow")

# Steps between two looks at the loss on an accelerator (each look is one tiny async copy).
CUDA_FINITE_CHECK_EVERY = 50
# torch.compile's backend; tests swap in "eager" to check graph counts without code generation.
COMPILE_BACKEND = "inductor"


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured, by metric name (schema.EPOCH_METRICS); accuracies in percent,
    `lr` the rate at the epoch's first step. `m.test_acc` reads one value."""

    epoch: int
    values: Mapping[str, float]

    def __getattr__(self, name: str) -> float:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no metric {name!r}")

    def as_metrics(self) -> dict[str, float]:
        """The values as logged at step = epoch: rounded to the digits they mean, as the
        summary metrics are (the UI shows what is logged, and 0.23900887 says no more than
        0.2390). Checkpoints and summaries keep the unrounded values."""
        return {name: rounded(name, value) for name, value in self.values.items()}

    def to_record(self) -> dict[str, float]:
        """A flat dict (epoch and values), as checkpoints keep the history."""
        return {"epoch": self.epoch, **self.values}

    @classmethod
    def from_record(cls, record: Mapping[str, float]) -> EpochMetrics:
        values = dict(record)
        return cls(int(values.pop("epoch")), values)

    def log_line(self, epochs: int) -> str:
        return " ".join([f"epoch {self.epoch}/{epochs}", *(
            f"{name} {EPOCH_METRICS[name].format(value)}" if name in EPOCH_METRICS
            else f"{name} {value:.6g}" for name, value in self.values.items())])


@dataclass
class TrainState:
    """Everything that training changes; `epoch` counts completed epochs.

    `runtime` says how it trains here (device, precision, compile); a checkpoint made under
    one runtime loads under another (a CUDA run resumed on a CPU host, say).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runtime: Runtime
    epoch: int = 0

    def state_dict(self) -> dict[str, object]:
        """Tensors, numbers and containers only, so it loads with `weights_only=True`."""
        # `fit` reseeds from (seed, epoch) before every epoch, so the RNG states are not needed
        # to resume exactly; they are kept so that a checkpoint is the whole state all the same.
        # Only the training device's: another machine may have fewer GPUs, or none.
        rng = {"cpu": torch.get_rng_state()}
        device = self.runtime.device
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what `state_dict` returned, on whatever device this state trains."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        torch.set_rng_state(state["rng"]["cpu"])
        cuda = state["rng"].get("cuda")
        if cuda is not None and self.runtime.device.type == "cuda":
            # Checkpoints before this one saved every visible GPU's state: take the first.
            torch.cuda.set_rng_state(cuda if isinstance(cuda, torch.Tensor) else cuda[0],
                                     self.runtime.device)


Scheduler = torch.optim.lr_scheduler.LRScheduler
# OneCycleLR: share of the steps spent warming up to the peak rate.
ONECYCLE_WARMUP = 0.3


def step_lr(config: TrainConfig, optimizer: torch.optim.Optimizer, _steps: int) -> Scheduler:
    """The seed's schedule: `lr`, times `gamma` every `step_size` epochs."""
    return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)


def one_cycle(config: TrainConfig, optimizer: torch.optim.Optimizer,
              steps_per_epoch: int) -> Scheduler:
    """OneCycleLR peaking at `lr` after 30% of the steps, annealed to ~0 by the last step.

    Momentum stays at `momentum` (no cycling), so that the logged param is the one used.
    """
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=ONECYCLE_WARMUP, cycle_momentum=False)


# config.SCHEDULERS name -> (constructor, stepped after every batch rather than every epoch)
SCHEDULER_BUILDERS: dict[str, tuple[Callable[[TrainConfig, torch.optim.Optimizer, int], Scheduler],
                            bool]] = {
    "step": (step_lr, False),
    "onecycle": (one_cycle, True),
}


def create_state(config: TrainConfig, runtime: Runtime, steps_per_epoch: int) -> TrainState:
    """Fresh model (initialized from `config.seed`), optimizer and scheduler."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.dropout).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    build_scheduler, _ = SCHEDULER_BUILDERS[config.scheduler]
    return TrainState(model, optimizer, build_scheduler(config, optimizer, steps_per_epoch),
                      runtime)


class TrainingModule:
    """What a training step calls: the model, compiled or not.

    A compiled model turns eager for good, with `fallback_reason` set and `on_fallback`
    called, when compiling or capturing a CUDA graph fails: a missing toolchain then costs a
    warning, not the run. Parameters are shared, so nothing is lost by the switch.
    """

    def __init__(self, eager: nn.Module, compiled: Callable[..., torch.Tensor] | None = None,
                 cuda_graphs: bool = False,
                 on_fallback: Callable[[str], None] | None = None) -> None:
        self.eager = eager
        self.compiled = compiled
        self.cuda_graphs = cuda_graphs
        self.on_fallback = on_fallback
        self.fallback_reason = ""

    @property
    def can_fall_back(self) -> bool:
        return self.compiled is not None

    def fall_back(self, err: Exception) -> None:
        """Train eager from now on, recording why compiling failed."""
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        self.fallback_reason = f"{type(err).__name__}: {first_line}"
        self.compiled = None
        self.cuda_graphs = False
        log.warning("torch.compile failed (%s); training eager instead", self.fallback_reason)
        if self.on_fallback is not None:
            self.on_fallback(self.fallback_reason)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (self.eager if self.compiled is None else self.compiled)(images)


def training_module(runtime: Runtime, model: nn.Module,
                    on_fallback: Callable[[str], None] | None = None) -> TrainingModule:
    """`model` compiled as `runtime` says, with its eager fallback."""
    if not runtime.compile:
        return TrainingModule(model)
    # Graphs of an earlier run in this process (a sweep's previous child) count towards
    # Dynamo's recompile limit of this code object: each run starts afresh.
    torch._dynamo.reset()
    # One static graph per batch shape (the full batch and the epoch's last one); on CUDA
    # replayed as CUDA graphs, which removes the per-kernel launch cost of this tiny net.
    compiled = torch.compile(model, backend=COMPILE_BACKEND, dynamic=False,
                             mode="reduce-overhead" if runtime.cuda_graphs else None)
    return TrainingModule(model, compiled, runtime.cuda_graphs, on_fallback)


class SoloSeed:
    """One seed, one model: the common stack of one. Its model may be compiled, with an eager
    fallback (TrainingModule); dropout masks come from torch's generator, seeded per epoch."""

    def __init__(self, config: TrainConfig, state: TrainState,
                 on_compile_fallback: Callable[[str], None] | None = None) -> None:
        self.configs = [config]
        self.states = [state]
        self.runtime = state.runtime
        self.optimizer = state.optimizer
        self.scheduler = state.scheduler
        _, self.per_step = SCHEDULER_BUILDERS[config.scheduler]
        self.model = training_module(state.runtime, state.model, on_compile_fallback)

    @property
    def epoch(self) -> int:
        return self.states[0].epoch

    @property
    def cuda_graphs(self) -> bool:
        return self.model.cuda_graphs

    @property
    def can_fall_back(self) -> bool:
        return self.model.can_fall_back

    def fall_back(self, err: Exception) -> None:
        self.model.fall_back(err)

    def batches(self, pipeline: Pipeline, epoch: int) -> Iterable[Batch]:
        """The epoch's batches; torch's generator seeded for the epoch's dropout masks."""
        seed = epoch_seed(self.configs[0].seed, epoch)
        torch.manual_seed(seed)
        self.model.eager.train()
        return pipeline.train_batches(seed)

    def losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The batch's loss (1,), correct answers (1,) and size."""
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.configs[0].label_smoothing)
        correct = (logits.detach().argmax(1) == labels).sum()
        return loss.unsqueeze(0), correct.unsqueeze(0), len(labels)

    def end_epoch(self, epoch: int) -> None:
        self.states[0].epoch = epoch


class Seeds(Protocol):
    """What the fit loop trains: one or more seeds of one configuration, stepped together.
    `SoloSeed` is one seed; `stacked.StackedSeeds` is several as one vmap'd model."""

    configs: list[TrainConfig]
    states: list[TrainState]
    runtime: Runtime
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    per_step: bool

    @property
    def epoch(self) -> int: ...

    @property
    def cuda_graphs(self) -> bool: ...

    @property
    def can_fall_back(self) -> bool: ...

    def fall_back(self, err: Exception) -> None: ...

    def batches(self, pipeline: Pipeline, epoch: int) -> Iterable[Any]: ...

    def losses(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]: ...

    def end_epoch(self, epoch: int) -> None: ...


def _forward_backward(seeds: Seeds, batch: Any, step: int,
                      steps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each seed's loss and correct count for one batch, gradients computed; TrainingDiverged
    at this step on the CPU. The one backward pass of the package: every seed's gradient is
    its own loss's, as the summed losses share no parameters."""
    if seeds.cuda_graphs:
        # CUDA graph trees reuse output memory; this says the previous step is done with it.
        torch.compiler.cudagraph_mark_step_begin()
    runtime = seeds.runtime
    dtype = runtime.autocast_dtype
    with torch.autocast(runtime.device.type, dtype, enabled=dtype is not None):
        losses, correct, size = seeds.losses(batch)
    if losses.device.type == "cpu" and not torch.isfinite(losses).all():
        raise TrainingDiverged(losses[~torch.isfinite(losses)][0].item(), step, steps)
    losses.sum().backward()
    return losses, correct, size


def train_one_epoch(seeds: Seeds, batches: Iterable[Any], steps: int = 0,
                    progress: tqdm | None = None) -> tuple[list[float], list[float]]:
    """One pass over `batches`; each seed's mean loss and accuracy %.

    A per-step schedule (OneCycleLR) is stepped after every batch; the loss is the training
    objective, label smoothing included.

    Raises TrainingDiverged when a loss is not finite: on the CPU at that very step, before
    the optimizer uses it; on an accelerator within CUDA_FINITE_CHECK_EVERY steps.
    Sums stay on the device and are read once, at the end of the epoch: no per-step sync.
    """
    optimizer = seeds.optimizer
    loss_sum = correct = None
    seen = 0
    # Accelerator: a flag copied to pinned host memory without waiting and read at the next
    # check, so that watching the loss never stalls the device queue.
    bad_flag: torch.Tensor | None = None
    step = 0
    for step, batch in enumerate(batches, 1):
        optimizer.zero_grad(set_to_none=True)
        try:
            losses, batch_correct, size = _forward_backward(seeds, batch, step, steps)
        except TrainingDiverged:
            raise
        except Exception as err:
            if not seeds.can_fall_back:
                raise
            # Compiling happens at a batch shape's first forward (and backward): redo this
            # step eager. No optimizer step has used the failed one's gradients.
            seeds.fall_back(err)
            optimizer.zero_grad(set_to_none=True)
            losses, batch_correct, size = _forward_backward(seeds, batch, step, steps)
        optimizer.step()
        if seeds.per_step:
            seeds.scheduler.step()
        batch_loss = losses.detach() * size
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        seen += size
        if losses.device.type != "cpu" and step % CUDA_FINITE_CHECK_EVERY == 0:
            # A non-finite step loss makes the running sum non-finite for good.
            if bad_flag is not None and bool(bad_flag):
                raise TrainingDiverged(math.nan, step, steps, exact=False)
            bad_flag = bad_flag if bad_flag is not None else torch.zeros(
                (), dtype=torch.bool, pin_memory=True)
            bad_flag.copy_(~torch.isfinite(loss_sum).all(), non_blocking=True)
        if progress is not None:
            progress.update(1)
    mean_losses = [total / seen for total in loss_sum.tolist()]
    bad = [loss for loss in mean_losses if not math.isfinite(loss)]
    if bad:
        raise TrainingDiverged(bad[0], step, steps, exact=False)
    return mean_losses, [100.0 * count / seen for count in correct.tolist()]


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[Batch]) -> tuple[float, float]:
    """Mean loss and accuracy % over `batches`, in eval mode.

    Always eager and true fp32 (no bf16, no TF32), whatever the training ran in: that is how
    the logged model is served, so logged and served accuracy agree.
    """
    model.eval()
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    seen = 0
    with true_fp32():
        for images, labels in batches:
            logits = model(images)
            loss_sum = loss_sum.to(logits.device) + F.cross_entropy(logits, labels,
                                                                    reduction="sum")
            correct = correct.to(logits.device) + (logits.argmax(1) == labels).sum()
            seen += len(labels)
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


def evaluated(model: nn.Module, pipeline: Pipeline) -> dict[str, float]:
    """An epoch's validation (where held out) and test loss and accuracy of `model`."""
    values = {}
    if pipeline.num_val:
        values[VAL_LOSS], values[VAL_ACC] = evaluate(model, pipeline.val_batches())
    values[TEST_LOSS], values[TEST_ACC] = evaluate(model, pipeline.test_batches())
    return values


@torch.inference_mode()
def predict(model: nn.Module, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's predicted class and the probability given to it, in batch order (CPU).

    Computed as `evaluate` computes (eager, true fp32, eval mode, argmax of the logits), so
    the answers agree with the accuracy it reports.
    """
    model.eval()
    classes, confidences = [], []
    with true_fp32():
        for images, _ in batches:
            logits = model(images)
            predicted = logits.argmax(1)
            probabilities = torch.softmax(logits.float(), dim=1)
            classes.append(predicted.cpu())
            confidences.append(probabilities.gather(1, predicted.unsqueeze(1)).squeeze(1).cpu())
    return torch.cat(classes), torch.cat(confidences)


def fit_seeds(seeds: Seeds, pipeline: Pipeline,
              on_epoch: Callable[[int, EpochMetrics, TrainState], None] | None = None,
              progress: bool = True, until: int = 0) -> list[list[EpochMetrics]]:
    """The fit loop: train every seed from `seeds.epoch + 1` to its config's epochs (or to
    epoch `until`, when given: the schedule still spans all epochs, so these epochs are those
    of the whole run), calling `on_epoch(index, metrics, state)` for each seed after each
    epoch; each seed's metrics per epoch.

    A seed's epoch_seconds is its share of the training pass plus its own evaluation. torch's
    thread count and deterministic mode are set for the training only.
    """
    config, runtime = seeds.configs[0], seeds.runtime
    histories: list[list[EpochMetrics]] = [[] for _ in seeds.states]
    steps_per_epoch = pipeline.steps_per_epoch
    stacked = len(seeds.states) > 1
    # Past Dynamo's recompile limit a model silently runs eager; raising instead makes the
    # fallback record it. (Eager runs do not import Dynamo at all.)
    no_silent_eager = (torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
                       if runtime.compile else contextlib.nullcontext())
    with torch_threads(runtime.threads), deterministic_algorithms(runtime.deterministic), \
            no_silent_eager:
        for epoch in range(seeds.epoch + 1, min(until or config.epochs, config.epochs) + 1):
            lr = seeds.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                      disable=None if progress else True, unit="batch") as bar:
                try:
                    train_losses, train_accs = train_one_epoch(
                        seeds, seeds.batches(pipeline, epoch), steps_per_epoch, bar)
                except TrainingDiverged as err:
                    err.epoch = epoch
                    raise
            if not seeds.per_step:
                seeds.scheduler.step()
            seeds.end_epoch(epoch)
            share = (time.perf_counter() - start) / len(seeds.states)
            for index, state in enumerate(seeds.states):
                begun = time.perf_counter()
                values = {TRAIN_LOSS: train_losses[index], TRAIN_ACC: train_accs[index],
                          **evaluated(state.model, pipeline)}
                metrics = EpochMetrics(epoch, {
                    **values, LR: lr, EPOCH_SECONDS: share + time.perf_counter() - begun})
                line = metrics.log_line(config.epochs)
                log.info(f"seed {seeds.configs[index].seed}: {line}" if stacked else line)
                histories[index].append(metrics)
                if on_epoch is not None:
                    on_epoch(index, metrics, state)
    return histories


def fit(config: TrainConfig, state: TrainState, pipeline: Pipeline,
        on_epoch: Callable[[EpochMetrics, TrainState], None] | None = None,
        progress: bool = True,
        on_compile_fallback: Callable[[str], None] | None = None,
        until: int = 0) -> list[EpochMetrics]:
    """`fit_seeds` for one seed: train `state` on, calling `on_epoch(metrics, state)` after
    each epoch; `on_compile_fallback(reason)` if a compiled model had to turn eager."""
    (history,) = fit_seeds(
        SoloSeed(config, state, on_compile_fallback), pipeline,
        None if on_epoch is None else lambda _index, metrics, trained: on_epoch(metrics, trained),
        progress, until)
    return history
