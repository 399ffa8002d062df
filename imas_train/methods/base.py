"""The method interface: what a training method declares, and what the generic loop (`imas_train.train`) does.

A method is one module under `imas_train.methods` holding a `Method` subclass (and, when it has settings, its
config section, a frozen dataclass in `imas_train.config`). The loop owns everything that is the same for every
method: data streams, the LR schedule, autocast, backward, the optimizer step of every trained network, gradient
accumulation, logging, evaluation, checkpoints and the artifact. The method owns what differs:

==========================  ===========================================================================================
`build_networks`            the networks trained with gradients, by name; each gets its own SGD optimizer
                            (one ``student`` by default; CPS trains two)
`model_config`              the model the method trains, from ``cfg.model`` (U2PL adds its representation head);
                            recorded in the artifact's sidecar
`forward_adaptor`           the module Accelerate prepares around each network (`StudentForward` by default)
`param_groups`              a network's optimizer groups (backbone and head, `imas_train.optim`, by default)
`setup_teachers`            no-grad models made from those networks before SyncBN and ``prepare`` (EMA teachers);
                            how they update is the method's business (`after_optimizer_step`)
`streams`                   which data streams an epoch reads (``labeled``, ``unlabeled``, ``unlabeled_mix``: a
                            second independent pass over the unlabeled set)
`label_pad`                 the label value of padded crop pixels (255 = ignored; U2PL pads with class 0)
`training_data`             the datasets the loop trains on, from the configured ones (ST++ re-trains on labeled +
                            stored pseudo-labeled images); as configured by default
`step`                      forward and losses of one iteration -> `StepResult` (total loss, named log values,
                            optional per-image records); no backward, no optimizer step
`after_optimizer_step`      teacher updates, after every optimizer step (sync steps only with accumulation)
`eval_models`               the models scored on val each evaluation; the FIRST one is selected by its mIoU and
                            becomes the artifact
`artifact`                  the exported model and what it is (``ema_teacher``, ``student``, ...)
`state_tensors` / `state`   extra state that must survive a resume (saved as safetensors and JSON, never pickle)
==========================  ===========================================================================================

The loop calls them in this order each iteration: `step` -> backward -> optimizer steps -> `after_optimizer_step`.
Randomness of a step comes only from ``ctx.generator`` (seeded from run seed, rank and iteration), so a resumed run
repeats every draw.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from imas_core.constants import IGNORE_INDEX
from imas_train.config import ModelConfig, TrainConfig
from imas_train.optim import param_groups

__all__ = ["Batch", "Method", "StepContext", "StepResult", "StudentForward", "broadcast_buffers", "step_generator"]

Batch = dict[str, Tensor]
Autocast = Callable[[], AbstractContextManager[object]]


@dataclass(frozen=True)
class StepContext:
    """What one iteration knows besides its batches.

    Attributes:
        step: global iteration i (0-based; = epoch * L + position in the epoch).
        epoch: the epoch in progress.
        iters_per_epoch: L.
        rank, world_size: this process and the number of processes.
        device: where the batches and the networks live.
        generator: this iteration's CPU generator (`step_generator`); every random draw of the step comes from it.
        autocast: context manager for forwards (``accelerator.autocast``); losses are computed in float32.
        gather_rows: concatenates a tensor's rows from every process in rank order (first dimensions may differ
            between processes; other dimensions must agree); identity with one process. Every process must call it.
    """

    step: int
    epoch: int
    iters_per_epoch: int
    rank: int
    world_size: int
    device: torch.device
    generator: torch.Generator
    autocast: Autocast
    gather_rows: Callable[[Tensor], Tensor] = lambda rows: rows


@dataclass
class StepResult:
    """What a method's `step` returns.

    Attributes:
        loss: the total loss, a 0-d tensor with grad; the loop calls backward on it.
        logs: 0-d detached values by name, averaged over the iterations (and processes) that report them and logged
            as ``train/<name>``. Names starting with ``loss`` are loss terms: a non-finite one stops training.
            Every name must be listed in the method's `log_keys`.
        per_image: optional records of this process's unlabeled images, (B,) each: ``easiness``, ``index`` (dataset
            index), ``ratio_s`` (student confident ratio), ``cutmix_fired`` (0/1). The loop gathers them over
            processes into the epoch's ``easiness/epoch_XXX.csv`` and the easiness plot.
    """

    loss: Tensor
    logs: dict[str, Tensor]
    per_image: dict[str, Tensor] = field(default_factory=dict)


class StudentForward(nn.Module):
    """The module Accelerate prepares around each trained network: one call returns ``(logits, logits_aux | None)``.

    The model's own ``forward`` returns logits only (docs/style.md rule 7); the training losses also need the aux
    head, and DDP only synchronises gradients of calls that go through the wrapper's ``forward``. This adaptor
    exists for that reason only; it is never exported.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, aux_batch: int | None = None, with_aux: bool = True) -> tuple[Tensor, Tensor | None]:
        """Main logits and, with `with_aux`, aux logits on the first `aux_batch` images (None = all)."""
        if not with_aux:
            return self.model(x), None
        return self.model.forward_with_aux(x, aux_batch)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator of one iteration's draws (CutMix trigger, boxes, partners, ...).

    Seeded from (run seed, process rank, global iteration) only, so a resumed run reproduces every draw without
    saved RNG state, and ranks draw independently (docs/algorithm.md §10, "Seeding").
    """
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's floating buffers (BN running statistics) to every rank, in one collective.

    Multi-process CPU runs have no SyncBN, so each rank's student has its own BN statistics after its train-mode
    forward and each rank's EMA teacher would drift apart; the teacher that is evaluated, checkpointed and exported
    must be the same everywhere. Call after an EMA update when ``world_size > 1`` and the device is not CUDA.
    """
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    flat = torch.cat([b.flatten() for b in buffers])
    torch.distributed.broadcast(flat, src=0)
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        buffer.copy_(value.view_as(buffer))


class Method(abc.ABC):
    """One semi-supervised (or supervised) training method; see the module docstring for the contract.

    Class attributes:
        name: the config's ``method:`` value.
        uses_unlabeled: an epoch is one pass over the unlabeled set (True) or over the labeled set (False).
        log_keys: every name `step` may put in `StepResult.logs` (the loop's meters need the full set up front,
            identical on every process).
    """

    name: ClassVar[str]
    uses_unlabeled: ClassVar[bool]
    log_keys: ClassVar[tuple[str, ...]]

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    @property
    def label_pad(self) -> int:
        """Label value of padded pixels in training crops; 255 (ignored) unless a method's reference says otherwise."""
        return IGNORE_INDEX

    def training_data(self, data: Any) -> Any:
        """The `imas_train.data.Datasets` to train on, given the configured ones (val stays as it is). Default: as
        is. An epoch is one pass over the returned labeled set (or unlabeled set, `uses_unlabeled`)."""
        return data

    def model_config(self, model: ModelConfig) -> ModelConfig:
        """The model this method trains, given the config's; the artifact's sidecar records it. Default: as is."""
        return model

    def forward_adaptor(self, model: nn.Module) -> nn.Module:
        """The module prepared around a trained network (its ``forward`` is what `step` calls). Default:
        `StudentForward`, returning ``(logits, logits_aux | None)``."""
        return StudentForward(model)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """The SGD parameter groups of one trained network at base LR `lr` (after the config's LR scaling). Default:
        backbone and head groups with ``optim.head_lr_mult`` and ``optim.weight_decay`` (`imas_train.optim`)."""
        return param_groups(model, lr, self.cfg.optim.head_lr_mult, self.cfg.optim.weight_decay)

    def build_networks(self, new_model: Callable[[], nn.Module]) -> dict[str, nn.Module]:
        """The networks trained with gradients, by name, in optimizer order. Default: one ``student``.

        Args:
            new_model: builds one segmentation model from ``cfg.model`` (fresh init, pretrained backbone loaded);
                call it once per network: successive calls draw different initial weights.
        """
        return {"student": new_model()}

    def setup_teachers(self, networks: Mapping[str, nn.Module], device: torch.device) -> None:  # noqa: B027
        """Create the no-grad models from the freshly built `networks` (before SyncBN and prepare). Default: none."""

    def streams(self, epoch: int) -> tuple[str, ...]:
        """The data streams epoch `epoch` reads, from ``("labeled", "unlabeled", "unlabeled_mix")``."""
        return ("labeled", "unlabeled") if self.uses_unlabeled else ("labeled",)

    @abc.abstractmethod
    def step(self, forwards: Mapping[str, nn.Module], batches: Mapping[str, Batch], ctx: StepContext) -> StepResult:
        """Forward and losses of one iteration.

        Args:
            forwards: the prepared `StudentForward` of every trained network, by name, in train mode.
            batches: this process's batch of every stream `streams` named, on the device, images normalised:
                labeled ``{"image": (B, 3, H, W), "label": (B, H, W) int64, "index"}``, unlabeled
                ``{"image_w", "image_s": (B, 3, H, W) pixel-aligned, "valid": (B, H, W) bool, "index"}``.
            ctx: iteration, epoch, process, generator and autocast.
        """

    def after_optimizer_step(self, networks: Mapping[str, nn.Module], ctx: StepContext) -> None:  # noqa: B027
        """Update the no-grad models from the unwrapped `networks` after the optimizer step. Default: nothing."""

    def eval_models(self, networks: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """Models to score on val, by name; the first is model-selected and exported. Default: the first network."""
        name, model = next(iter(networks.items()))
        return {name: model}

    def artifact(self, networks: Mapping[str, nn.Module]) -> tuple[str, nn.Module]:
        """(what it is, the model) written as the teacher artifact; must be the first of `eval_models`."""
        name, model = next(iter(self.eval_models(networks).items()))
        return name, model

    def state_tensors(self) -> dict[str, Tensor]:
        """Extra tensors a resume needs (teachers, memory banks), saved as safetensors. Default: none."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore what `state_tensors` returned."""
        if tensors:
            raise ValueError(f"method {self.name!r} keeps no tensor state, got {sorted(tensors)[:5]}")

    def state(self) -> dict[str, Any]:
        """Extra JSON-serialisable state a resume needs (e.g. a pipeline stage). Default: none."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `state` returned."""
        if state:
            raise ValueError(f"method {self.name!r} keeps no JSON state, got {sorted(state)[:5]}")
