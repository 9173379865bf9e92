"""Several seeds of one configuration trained as one stacked model: how a tiny net fills a GPU.

A 6,000-parameter net cannot keep a GPU busy with one seed per pass; S seeds stacked can.
`torch.func.stack_module_state` stacks the seeds' parameters (S, ...), and `vmap` runs
`functional_call` of one template net over them in a single pass. Each seed keeps what it
would have alone: its initialisation (`create_state` under its seed), its data order and
augmentation (the pipeline's batches for its epoch seed), its dropout masks (drawn from its
own generator, seeded as `fit` seeds torch's, in the same order: `models.STACKED_MASKS`),
and its own loss, whose gradient reaches its parameters alone (the stacked loss is the sum).
SGD is elementwise and the schedule depends on the step alone, so the stacked update is each
seed's own. After every epoch each seed is written back into its own `TrainState` (weights,
BatchNorm statistics, momentum) and evaluated as a model trained alone is: its metrics, its
checkpoint and its logged model are those of a solo run, to float tolerance.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from mnist_mlflow.config import TrainConfig, TrainingDiverged, UserError
from mnist_mlflow.data import Pipeline, epoch_seed
from mnist_mlflow.models import STACKED_MASKS, dropout_mask
from mnist_mlflow.runtime import Runtime, deterministic_algorithms, torch_threads
from mnist_mlflow.schema import (
    EPOCH_SECONDS,
    LR,
    TRAIN_ACC,
    TRAIN_LOSS,
)
from mnist_mlflow.training import (
    SCHEDULER_BUILDERS,
    EpochMetrics,
    TrainState,
    create_state,
    evaluated,
)

log = logging.getLogger("mnist_mlflow")


class StackedSeeds:
    """The seeds of one configuration as stacked parameters, with one optimizer and schedule;
    `states` are the seeds' own TrainStates, brought up to date after every epoch."""

    def __init__(self, configs: Sequence[TrainConfig], runtime: Runtime,
                 steps_per_epoch: int) -> None:
        if len({c.config_group for c in configs}) != 1:
            raise UserError("stacked seeds must share everything but the seed")
        if runtime.compile:
            raise UserError("stacked seeds train eager: use --compile off (or auto on the CPU)")
        self.configs = list(configs)
        self.runtime = runtime
        self.states = [create_state(c, runtime, steps_per_epoch) for c in configs]
        params, buffers = stack_module_state([s.model for s in self.states])
        self.params = {name: tensor.detach().requires_grad_() for name, tensor in params.items()}
        self.buffers = buffers
        # The template's own tensors are never used: functional_call swaps in each seed's.
        self.template = copy.deepcopy(self.states[0].model).to("meta")
        config = configs[0]
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=config.lr,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        build_scheduler, self.per_step = SCHEDULER_BUILDERS[config.scheduler]
        self.scheduler = build_scheduler(config, self.optimizer, steps_per_epoch)
        self.epoch = 0
        self._mask_shapes: dict[int, list[torch.Size]] = {}

    def mask_shapes(self, batch: torch.Tensor) -> list[torch.Size]:
        """The input shape of each Dropout for a batch like `batch`, in forward order."""
        size = batch.shape[0]
        if size not in self._mask_shapes:
            model = self.states[0].model
            shapes: list[torch.Size] = []
            hooks = [m.register_forward_hook(lambda _m, inputs, _out: shapes.append(
                inputs[0].shape)) for m in model.modules() if isinstance(m, nn.Dropout) and m.p]
            was_training = model.training
            model.eval()  # no BatchNorm statistics touched, no mask drawn
            try:
                with torch.no_grad():
                    model(batch)
            finally:
                model.train(was_training)
                for hook in hooks:
                    hook.remove()
            self._mask_shapes[size] = shapes
        return self._mask_shapes[size]

    def forward(self, images: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        """Logits (S, B, 10) of images (S, B, ...), with each seed's masks (S, ...)."""
        def one_seed(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                     x: torch.Tensor, seed_masks: list[torch.Tensor]) -> torch.Tensor:
            token = STACKED_MASKS.set(iter(seed_masks))
            try:
                return functional_call(self.template, (params, buffers), (x,))
            finally:
                STACKED_MASKS.reset(token)
        return vmap(one_seed)(self.params, self.buffers, images, masks)

    def write_back(self) -> None:
        """Each seed's weights, BatchNorm statistics, momentum and schedule into its state."""
        momentum = [self.optimizer.state.get(p, {}).get("momentum_buffer")
                    for p in self.params.values()]
        for index, state in enumerate(self.states):
            with torch.no_grad():
                for name, tensor in state.model.named_parameters():
                    tensor.copy_(self.params[name][index])
                for name, tensor in state.model.named_buffers():
                    tensor.copy_(self.buffers[name][index])
            for param, stacked in zip(state.model.parameters(), momentum, strict=True):
                if stacked is not None:
                    state.optimizer.state[param]["momentum_buffer"] = stacked[index].clone()
            state.scheduler.load_state_dict(self.scheduler.state_dict())
            for group in state.optimizer.param_groups:
                group["lr"] = self.optimizer.param_groups[0]["lr"]
            state.epoch = self.epoch


def train_epoch(stack: StackedSeeds, pipeline: Pipeline, epoch: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch of every seed at once: per-seed loss sums and correct counts, images seen."""
    configs, runtime = stack.configs, stack.runtime
    device = runtime.device
    seeds = [epoch_seed(c.seed, epoch) for c in configs]
    # What `fit` does with torch's generator before an epoch, each seed with its own.
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    p = configs[0].dropout
    loss_sum = torch.zeros(len(configs), device=device)
    correct = torch.zeros(len(configs), dtype=torch.long, device=device)
    seen = 0
    steps = pipeline.steps_per_epoch
    seeds_batches = zip(*(pipeline.train_batches(s) for s in seeds), strict=True)
    for step, batches in enumerate(seeds_batches, 1):
        images = torch.stack([b[0] for b in batches])
        labels = torch.stack([b[1] for b in batches])
        shapes = stack.mask_shapes(images[0]) if p else []
        # Drawn seed by seed, and within a seed layer by layer, as each seed alone draws;
        # then stacked per layer.
        drawn = [[dropout_mask(shape, p, g, device) for shape in shapes] for g in generators]
        masks = [torch.stack(layer) for layer in zip(*drawn, strict=True)] if shapes else []
        stack.optimizer.zero_grad(set_to_none=True)
        dtype = runtime.autocast_dtype
        with torch.autocast(device.type, dtype, enabled=dtype is not None):
            logits = stack.forward(images, masks)
            losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                                     label_smoothing=configs[0].label_smoothing
                                     ).view(len(configs), -1).mean(1)
        if device.type == "cpu" and not torch.isfinite(losses).all():
            bad = losses[~torch.isfinite(losses)][0].item()
            raise TrainingDiverged(bad, step, steps)
        losses.sum().backward()  # each seed's gradient is its own loss's
        stack.optimizer.step()
        if stack.per_step:
            stack.scheduler.step()
        loss_sum += losses.detach() * labels.shape[1]
        correct += (logits.detach().argmax(-1) == labels).sum(1)
        seen += labels.shape[1]
    return loss_sum, correct, seen


def fit_stacked(stack: StackedSeeds, pipeline: Pipeline,
                on_epoch: Callable[[int, EpochMetrics, TrainState], None] | None = None,
                evaluate_seeds: bool = True) -> list[list[EpochMetrics]]:
    """Train every seed from `stack.epoch + 1` to the end; each seed's metrics per epoch,
    `on_epoch(index, metrics, state)` called for each seed after each epoch. A seed's
    epoch_seconds is the stacked epoch's wall time divided among the seeds."""
    histories: list[list[EpochMetrics]] = [[] for _ in stack.configs]
    config, runtime = stack.configs[0], stack.runtime
    with torch_threads(runtime.threads), deterministic_algorithms(runtime.deterministic):
        for epoch in range(stack.epoch + 1, config.epochs + 1):
            lr = stack.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            try:
                loss_sum, correct, seen = train_epoch(stack, pipeline, epoch)
            except TrainingDiverged as err:
                err.epoch = epoch
                raise
            train_loss = (loss_sum / seen).tolist()
            train_acc = (100.0 * correct / seen).tolist()
            if not stack.per_step:
                stack.scheduler.step()
            stack.epoch = epoch
            stack.write_back()
            share = (time.perf_counter() - start) / len(stack.configs)
            for index, state in enumerate(stack.states):
                values = {TRAIN_LOSS: train_loss[index], TRAIN_ACC: train_acc[index],
                          **(evaluated(state.model, pipeline) if evaluate_seeds else {})}
                metrics = EpochMetrics(epoch, {**values, LR: lr, EPOCH_SECONDS: share})
                log.info("seed %d: %s", stack.configs[index].seed,
                         metrics.log_line(config.epochs))
                histories[index].append(metrics)
                if on_epoch is not None:
                    on_epoch(index, metrics, state)
    return histories
