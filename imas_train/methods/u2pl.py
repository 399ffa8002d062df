"""``method: u2pl``: U2PL, a mean teacher that also learns from its unreliable pixels (shared/methods/U2PL.md).

One semi-supervised iteration (§2.B): eval-mode teacher pseudo-labels on the unlabeled batch; CutMix with a 50 % box
and the next image as partner on half of the iterations (one draw shared by every process, as the reference seeds
numpy identically on every rank); one train-mode student forward on [x; ũ] with the representation head; a second,
TRAIN-mode teacher forward on [x; ũ] whose entropies drop the most uncertain α_t % of pseudo-labels from L_u and
partition pixels for the contrastive loss, whose negatives go through a per-class memory bank shared by every
process. L = L_x + λ_u·L_u + (contrast_weight / W_ref)·L_c: the reference all-reduces L_c before backward, which
autograd does not see, so its gradient is 1/W of the usual one (methods/README.md §3 item 1); it is reproduced as
that explicit factor. Supervised-only epochs (epoch < s, §2.A) train L_x and move the teacher's BN statistics with a
train-mode forward on x; the EMA (parameters only, 0.99) starts at epoch s, where the teacher equals the student.

Faithful quirks are the defaults; each clean alternative is a flag of `U2plConfig` (§9, docs/methods.md).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imas_core.errors import ConfigError
from imas_train.config import ModelConfig, TrainConfig, U2plConfig
from imas_train.ema import EmaTeacher, ema_decay
from imas_train.imas import cutmix_fires
from imas_train.memory_bank import MemoryBank
from imas_train.methods.base import Batch, Method, StepContext, StepResult, broadcast_buffers, step_generator
from imas_train.methods.supervised import labeled_loss
from imas_train.mixing import u2pl_cutmix
from imas_train.pixel_stats import entropy as pixel_entropy
from imas_train.u2pl import ContrastSettings, contrastive_loss, drop_percent, entropy_filter, filtered_pseudo_loss

__all__ = ["RepForward", "U2plMethod"]


def _up(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=True, to `size` (the reference's upsampling of decoder outputs)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class RepForward(nn.Module):
    """The module Accelerate prepares for U2PL: ``forward(x) -> (logits (B, C, h, w), rep (B, R, h, w), aux | None)``
    at the decoder resolution (`DeepLabV3Plus.forward_with_rep`); never exported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        out: tuple[Tensor, Tensor, Tensor | None] = self.model.forward_with_rep(x)
        return out


class U2plMethod(Method):
    """U2PL (U2PL.md): student + EMA teacher with a representation head and a negative memory bank."""

    name: ClassVar[str] = "u2pl"
    uses_unlabeled: ClassVar[bool] = True
    log_keys: ClassVar[tuple[str, ...]] = (
        "loss", "loss_x", "loss_u", "loss_c", "kept_ratio", "cutmix_rate", "valid_classes", "bank_rows",
    )  # fmt: skip

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if cfg.u2pl is None:
            raise ConfigError("method 'u2pl' needs a u2pl: section (at least sup_only_epochs and reference_world_size)")
        self.u2pl: U2plConfig = cfg.u2pl
        c = cfg.model.num_classes
        sizes = [self.u2pl.bank_size_class0] + [self.u2pl.bank_size] * (c - 1)
        self.bank = MemoryBank(sizes, cfg.model.rep_channels)
        self.ema: EmaTeacher | None = None
        self.sync_buffers = False  # several CPU processes: every rank keeps rank 0's teacher statistics
        self.epoch = 0  # the epoch of the latest step (evaluation scores the student during supervised-only epochs)

    @property
    def teacher(self) -> EmaTeacher:
        if self.ema is None:
            raise RuntimeError("setup_teachers has not run")
        return self.ema

    @property
    def label_pad(self) -> int:
        return self.u2pl.label_pad_value

    def model_config(self, model: ModelConfig) -> ModelConfig:
        return dataclasses.replace(model, rep_head=True)  # the contrastive loss reads the representation

    def forward_adaptor(self, model: nn.Module) -> nn.Module:
        return RepForward(model)

    def setup_teachers(self, networks: Mapping[str, nn.Module], device: torch.device) -> None:
        """The EMA teacher. Its BN statistics come from its own train-mode forwards: with several CUDA processes it
        uses SyncBatchNorm as the reference does; several CPU processes keep rank 0's statistics (broadcast after
        every update), so the teacher is the same on every process."""
        teacher = copy.deepcopy(networks["student"]).to(device)
        self.sync_buffers = False
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1 and device.type == "cuda":
                teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
            else:
                self.sync_buffers = torch.distributed.get_world_size() > 1
        self.ema = EmaTeacher(teacher, ema_buffers=self.u2pl.ema_buffers)

    def streams(self, epoch: int) -> tuple[str, ...]:
        return ("labeled",) if epoch < self.u2pl.sup_only_epochs else ("labeled", "unlabeled")

    def step(self, forwards: Mapping[str, nn.Module], batches: Mapping[str, Batch], ctx: StepContext) -> StepResult:
        self.epoch = ctx.epoch
        student, teacher, u = forwards["student"], self.teacher.module, self.u2pl
        x, y = batches["labeled"]["image"], batches["labeled"]["label"]
        b, size = x.shape[0], (x.shape[-2], x.shape[-1])
        loss_cfg = self.cfg.loss
        if ctx.epoch < u.sup_only_epochs:  # §2.A: L_x; the teacher's BN statistics follow x; no EMA
            with ctx.autocast():
                logits, rep, aux = student(x)
            loss_x = labeled_loss(_up(logits, size).float(), _aux(aux, size, b), y, loss_cfg)
            with torch.no_grad(), ctx.autocast():
                teacher.train()
                teacher(x)
                teacher.eval()
            loss = loss_x + 0.0 * rep.float().sum()
            return StepResult(loss=loss, logs={"loss": loss.detach(), "loss_x": loss_x.detach()})
        image_u = batches["unlabeled"]["image_w"]
        # 2. pseudo-labels from the eval-mode teacher on the unmixed images
        with torch.no_grad(), ctx.autocast():
            logits_t = teacher(image_u)
        conf_u, pseudo_u = logits_t.float().softmax(dim=1).max(dim=1)
        # 3. CutMix on half of the iterations: the draw and the boxes are the same on every process
        shared = step_generator(self.cfg.run.seed, 0, ctx.step)
        fired = cutmix_fires(u.cutmix_prob, shared)
        if fired:
            image_u, pseudo_u, conf_u = u2pl_cutmix(image_u, pseudo_u, conf_u, shared)
        # 4-5. one train-mode student forward on [x; ũ]; L_x on the labeled slice (aux too)
        inputs = torch.cat([x, image_u])
        with ctx.autocast():
            logits, rep, aux = student(inputs)
        logits_up = _up(logits, size).float()
        loss_x = labeled_loss(logits_up[:b], _aux(aux, size, b), y, loss_cfg)
        # 6. the teacher again, in TRAIN mode (batch statistics; moves its running statistics) on [x; ũ]
        with torch.no_grad(), ctx.autocast():
            teacher.train()
            logits_t2, rep_t, _ = teacher.forward_with_rep(inputs)
            teacher.eval()
        prob_t = logits_t2.float().softmax(dim=1)
        entropy = pixel_entropy(_up(logits_t2[b:].float(), size).softmax(dim=1))
        # 7. entropy-filtered pseudo-label loss
        alpha_t = drop_percent(ctx.epoch, self.cfg.optim.epochs, 100.0 - u.drop_percent)
        target = entropy_filter(pseudo_u, entropy, alpha_t)
        loss_u, kept = filtered_pseudo_loss(logits_up[b:], target)
        # 8. contrastive loss with the memory bank
        settings = ContrastSettings(
            alpha=drop_percent(ctx.epoch, self.cfg.optim.epochs, u.low_entropy_threshold),
            low_rank=u.low_rank, high_rank=u.high_rank, anchor_threshold=u.anchor_threshold,
            negative_threshold=u.negative_threshold, num_anchors=u.num_anchors, num_negatives=u.num_negatives,
            temperature=u.temperature, negatives_require_label=u.negatives_require_label,
            fix_class_indexing=u.fix_class_indexing, per_image_onehot=u.per_image_onehot,
        )  # fmt: skip
        loss_c, valid = contrastive_loss(rep, rep_t, prob_t, y, pseudo_u, entropy, self.bank, settings, ctx.generator,
                                         ctx.gather_rows)  # fmt: skip
        # 9. total: the contrastive term at its effective weight contrast_weight / W_ref
        loss = loss_x + u.unsup_weight * loss_u + (u.contrast_weight / u.reference_world_size) * loss_c
        logs = {
            "loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_c": loss_c.detach(),
            "kept_ratio": kept, "cutmix_rate": torch.tensor(float(fired)),
            "valid_classes": torch.tensor(float(valid)), "bank_rows": torch.tensor(float(len(self.bank))),
        }  # fmt: skip
        return StepResult(loss=loss, logs=logs)

    def after_optimizer_step(self, networks: Mapping[str, nn.Module], ctx: StepContext) -> None:
        """10. EMA of the parameters from epoch s on, decay 0 throughout epoch s (item 1: the teacher IS the student
        there); none during the supervised-only epochs except after their last step, so that epoch s starts with
        teacher = student as the reference's aliasing does."""
        if ctx.step + 1 < self.u2pl.sup_only_epochs * ctx.iters_per_epoch:
            return
        decay = ema_decay(ctx.step, ctx.iters_per_epoch, self.u2pl.sup_only_epochs, self.u2pl.ema_decay)
        self.teacher.update(networks["student"], decay)
        if self.sync_buffers:
            broadcast_buffers(self.teacher.module)

    def eval_models(self, networks: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """The student during supervised-only epochs, else the teacher (§2.B item 11)."""
        if self.epoch < self.u2pl.sup_only_epochs:
            return {"student": networks["student"]}
        models: dict[str, nn.Module] = {"teacher": self.teacher.module}
        if self.cfg.eval.student:
            models["student"] = networks["student"]
        return models

    def artifact(self, networks: Mapping[str, nn.Module]) -> tuple[str, nn.Module]:
        return "ema_teacher", self.teacher.module

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"ema_teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        tensors.update(self.bank.state_tensors("bank."))
        return tensors

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        teacher = {k[len("ema_teacher.") :]: v for k, v in tensors.items() if k.startswith("ema_teacher.")}
        unknown = sorted(k for k in tensors if not k.startswith(("ema_teacher.", "bank.")))
        if unknown:
            raise ValueError(f"method 'u2pl' state has unknown tensors: {unknown[:5]}")
        self.teacher.load_state_dict(teacher)
        self.bank.load_state_tensors(tensors, "bank.")


def _aux(aux: Tensor | None, size: tuple[int, int], b: int) -> Tensor | None:
    """The labeled slice of the aux logits, upsampled to the crop (computed on every image, used on x only)."""
    return None if aux is None else _up(aux[:b], size).float()
