"""The training loop. Knows nothing of MLflow: it returns plain numbers per epoch.

The whole state of a run (model, optimizer, scheduler, completed epochs) is one explicit
object; data order, augmentation and dropout of epoch `e` are derived from (seed, e), so
training can stop after any epoch and go on later exactly as if it had not stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.data import Batch, Pipeline, epoch_seed
from mnist_mlflow.models import build_model

log = logging.getLogger("mnist_mlflow")

# Steps between two looks at the loss on an accelerator (each look is one tiny async copy).
CUDA_FINITE_CHECK_EVERY = 50


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite at `step` (a batch of the epoch)."""

    def __init__(self, loss: float, step: int, steps: int, exact: bool = True) -> None:
        super().__init__(loss, step, steps, exact)
        self.loss = loss
        self.step = step
        self.steps = steps
        # On CUDA the loss is checked every few steps only: it went bad at `step` or before.
        self.exact = exact
        self.epoch = 0  # filled in by `fit`, which knows the epoch

    def __str__(self) -> str:
        where = "at" if self.exact else "by"
        return (f"non-finite training loss ({self.loss}) in epoch {self.epoch}, "
                f"{where} step {self.step} of {self.steps}")


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch produced; accuracies in percent, `lr` is the rate at its first step."""

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    epoch_seconds: float

    def as_metrics(self) -> dict[str, float]:
        """Everything but the epoch number, which is the MLflow step."""
        values = asdict(self)
        del values["epoch"]
        return values

    def log_line(self, epochs: int) -> str:
        return (f"epoch {self.epoch}/{epochs} train_loss {self.train_loss:.4f} "
                f"train_acc {self.train_acc:.2f}% test_loss {self.test_loss:.4f} "
                f"test_acc {self.test_acc:.2f}% lr {self.lr:.6g} {self.epoch_seconds:.1f}s")


@dataclass
class TrainState:
    """Everything that training changes; `epoch` counts completed epochs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0

    def state_dict(self) -> dict[str, object]:
        """Tensors, numbers and containers only, so it loads with `weights_only=True`."""
        # `fit` reseeds from (seed, epoch) before every epoch, so the RNG states are not needed
        # to resume exactly; they are kept so that a checkpoint is the whole state all the same.
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what `state_dict` returned (the CUDA RNG only when CUDA is in use)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_initialized():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


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


def create_state(config: TrainConfig, device: torch.device, steps_per_epoch: int) -> TrainState:
    """Fresh model (initialized from `config.seed`), optimizer and scheduler."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.dropout).to(device)
    if config.channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    build_scheduler, _ = SCHEDULER_BUILDERS[config.scheduler]
    return TrainState(model, optimizer, build_scheduler(config, optimizer, steps_per_epoch))


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterable[Batch], progress: tqdm | None = None,
                    autocast_dtype: torch.dtype | None = None,
                    cuda_graphs: bool = False, steps: int = 0,
                    step_scheduler: Scheduler | None = None,
                    label_smoothing: float = 0.0) -> tuple[float, float]:
    """One pass over `batches`; returns (mean loss, accuracy %).

    `step_scheduler` is stepped after every batch (OneCycleLR); the loss is the training
    objective, label smoothing included.

    Raises TrainingDiverged when the loss is not finite: on the CPU at that very step, before
    the optimizer uses it; on an accelerator within CUDA_FINITE_CHECK_EVERY steps.
    Sums stay on the device and are read once, at the end of the epoch: no per-step sync.
    """
    model.train()
    loss_sum = correct = None
    seen = 0
    # Accelerator: a flag copied to pinned host memory without waiting and read at the next
    # check, so that watching the loss never stalls the device queue.
    bad_flag: torch.Tensor | None = None
    step = 0
    for step, (images, labels) in enumerate(batches, 1):
        if cuda_graphs:
            # CUDA graph trees reuse output memory; this says the previous step is done with it.
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        if loss.device.type == "cpu" and not torch.isfinite(loss):
            raise TrainingDiverged(loss.item(), step, steps)
        loss.backward()
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        batch_loss = loss.detach() * len(labels)
        batch_correct = (logits.detach().argmax(1) == labels).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        seen += len(labels)
        if loss.device.type != "cpu" and step % CUDA_FINITE_CHECK_EVERY == 0:
            # A non-finite step loss makes the running sum non-finite for good.
            if bad_flag is not None and bool(bad_flag):
                raise TrainingDiverged(math.nan, step, steps, exact=False)
            bad_flag = bad_flag if bad_flag is not None else torch.zeros(
                (), dtype=torch.bool, pin_memory=True)
            bad_flag.copy_(~torch.isfinite(loss_sum), non_blocking=True)
        if progress is not None:
            progress.update(1)
    mean_loss = loss_sum.item() / seen
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(mean_loss, step, steps, exact=False)
    return mean_loss, 100.0 * correct.item() / seen


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[Batch]) -> tuple[float, float]:
    """Mean loss and accuracy % over `batches`, in eval mode.

    Always eager fp32, whatever the training precision: that is how the logged model is served.
    """
    model.eval()
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    seen = 0
    for images, labels in batches:
        logits = model(images)
        loss_sum = loss_sum.to(logits.device) + F.cross_entropy(logits, labels, reduction="sum")
        correct = correct.to(logits.device) + (logits.argmax(1) == labels).sum()
        seen += len(labels)
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


def training_model(config: TrainConfig, model: nn.Module,
                   device: torch.device) -> tuple[nn.Module, bool]:
    """The module to train with (compiled or not) and whether it replays CUDA graphs."""
    if not config.compiles(device):
        return model, False
    cuda_graphs = device.type == "cuda"
    # One static graph per batch shape (the full batch and the epoch's last one); on CUDA
    # replayed as CUDA graphs, which removes the per-kernel launch cost of this tiny net.
    compiled = torch.compile(model, dynamic=False,
                             mode="reduce-overhead" if cuda_graphs else None)
    return compiled, cuda_graphs


def fit(config: TrainConfig, state: TrainState, pipeline: Pipeline,
        on_epoch: Callable[[EpochMetrics, TrainState], None] | None = None,
        progress: bool = True) -> list[EpochMetrics]:
    """Train from `state.epoch + 1` to `config.epochs`, calling `on_epoch` after each epoch."""
    history = []
    steps_per_epoch = pipeline.steps_per_epoch
    _, per_step = SCHEDULER_BUILDERS[config.scheduler]
    device = next(state.model.parameters()).device
    if config.threads:
        torch.set_num_threads(config.threads)
    autocast_dtype = config.autocast_dtype(device)
    train_model, cuda_graphs = training_model(config, state.model, device)
    for epoch in range(state.epoch + 1, config.epochs + 1):
        seed = epoch_seed(config.seed, epoch)
        torch.manual_seed(seed)  # dropout masks of this epoch
        lr = state.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                  disable=None if progress else True, unit="batch") as bar:
            try:
                train_loss, train_acc = train_one_epoch(train_model, state.optimizer,
                                                        pipeline.train_batches(seed), bar,
                                                        autocast_dtype, cuda_graphs,
                                                        steps_per_epoch,
                                                        state.scheduler if per_step else None,
                                                        config.label_smoothing)
            except TrainingDiverged as err:
                err.epoch = epoch
                raise
        test_loss, test_acc = evaluate(state.model, pipeline.test_batches())
        if not per_step:
            state.scheduler.step()
        state.epoch = epoch
        metrics = EpochMetrics(epoch, train_loss, train_acc, test_loss, test_acc, lr,
                               time.perf_counter() - start)
        log.info(metrics.log_line(config.epochs))
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, state)
    return history
