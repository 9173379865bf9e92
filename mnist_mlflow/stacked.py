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
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from mnist_mlflow.config import TrainConfig, UserError
from mnist_mlflow.data import Batch, Pipeline, epoch_seed
from mnist_mlflow.models import STACKED_MASKS, dropout_mask
from mnist_mlflow.runtime import Runtime
from mnist_mlflow.training import (
    SCHEDULER_BUILDERS,
    create_state,
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
        self._generators: list[torch.Generator] = []

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

    # What the fit loop asks of the seeds it trains (training.Seeds): stacked seeds train
    # eager, so there is no CUDA graph and no compiled model to fall back from.
    cuda_graphs = False
    can_fall_back = False

    def fall_back(self, err: Exception) -> None:
        raise err

    def batches(self, pipeline: Pipeline, epoch: int) -> Iterator[tuple[Batch, ...]]:
        """Each seed's batch of each step, as each seed alone gets it; each seed's dropout
        generator seeded as `fit` seeds torch's for the epoch."""
        seeds = [epoch_seed(c.seed, epoch) for c in self.configs]
        self._generators = [torch.Generator(device=self.runtime.device).manual_seed(s)
                            for s in seeds]
        return zip(*(pipeline.train_batches(s) for s in seeds), strict=True)

    def losses(self, batch: tuple[Batch, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every seed's loss (S,) and correct answers (S,) on its own batch, and the size."""
        images = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        p = self.configs[0].dropout
        shapes = self.mask_shapes(images[0]) if p else []
        # Drawn seed by seed, and within a seed layer by layer, as each seed alone draws;
        # then stacked per layer.
        drawn = [[dropout_mask(shape, p, g, self.runtime.device) for shape in shapes]
                 for g in self._generators]
        masks = [torch.stack(layer) for layer in zip(*drawn, strict=True)] if shapes else []
        logits = self.forward(images, masks)
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                                 label_smoothing=self.configs[0].label_smoothing
                                 ).view(len(self.configs), -1).mean(1)
        correct = (logits.detach().argmax(-1) == labels).sum(1)
        return losses, correct, labels.shape[1]

    def end_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.write_back()

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
