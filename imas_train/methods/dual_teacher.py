"""``method: dual_teacher``: Dual Teacher, two temporary EMA teachers switched by epoch (Na et al., NeurIPS 2023).

Specification: ``shared/methods/DualTeacher.md`` (cited as §N), which follows the official code (SegFormer on ADE20K
only); the DeepLabV3+ settings are assumptions, each a config value (`DualTeacherConfig`, docs/methods.md).

Even epochs: teacher 1 gives pseudo-labels and the mix is CutMix; odd epochs: teacher 2 and ClassMix. Only the active
teacher is EMA-updated, with alpha = min(1 - 1/(i + 1), 0.99) and i the iteration within the epoch, so after the
first step of each of its epochs it is a copy of the student (the reference's per-epoch restart; parameters only,
its BN statistics are its own). Teachers always run in TRAIN mode under no_grad (batch statistics), two forwards per
iteration. The student has stochastic depth (`DropPath` on every residual branch, rate linspace(0, p_max) over the
blocks); the teachers and the exported model have none. One iteration (§2):

1. u_s: colour jitter + grayscale on the normalised unlabeled batch, one draw per batch, clamped (§2 item 2).
2. The active teacher on u -> softmax, confidence, argmax.
3. CutMix epoch: Beta(4, 4) box, ``randperm`` partners, image and pseudo-label pasted, the receiver keeps its own
   (8-bit quantised) confidence; per-image jitter/blur/flip; L_mix = mean over CE > 0 of w_k·CE with w_k the
   image's confident fraction. ClassMix epoch: half of the teacher's classes per image, mixed strong views and
   probabilities; L_mix = ω·mean CE with ω the batch's confident fraction.
4. Student on [x; mix] (one call): L_x on x.
5. The active teacher again on u; the student on u_s (a separate call): L_ic, masked CE at conf ≥ 0.95.
6. L = L_x + L_mix + 0.2·L_ic; then the EMA of the active teacher (`after_optimizer_step`).

Every random draw of a step (drop-path masks included) comes from ``ctx.generator``, so a resume is exact.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from imas_core.errors import ConfigError
from imas_train.config import DualTeacherConfig, TrainConfig
from imas_train.dual_teacher import (
    active_teacher,
    classmix_loss,
    classmix_weight,
    consistency_loss,
    cutmix_image_weights,
    cutmix_loss,
    ema_decay_in_epoch,
    post_mix_augment,
    quantise_conf,
    strong_view,
    uses_cutmix,
)
from imas_train.ema import EmaTeacher
from imas_train.methods.base import Autocast, Batch, Method, StepContext, StepResult, broadcast_buffers
from imas_train.methods.supervised import labeled_loss
from imas_train.mixing import (
    box_mask,
    class_mix,
    class_mix_mask,
    paste_from_partners,
    permutation_partners,
    sample_beta_boxes,
)
from imas_train.models.resnet import set_drop_path_generator, set_drop_path_rate

__all__ = ["DualTeacherMethod", "teacher_predictions"]

TEACHERS = (1, 2)


@torch.no_grad()
def teacher_predictions(teacher: nn.Module, images: Tensor, autocast: Autocast) -> Tensor:
    """Softmax (float32) of a TRAIN-mode, no-grad teacher forward (§2 items 3a, 4a, 5a); the teacher goes back to
    eval mode afterwards. Train mode: BN normalises with the batch's statistics (and moves the teacher's running
    statistics, which only its evaluation reads); dropout, where the decoder has it, is active."""
    teacher.train()
    try:
        with autocast():
            logits = teacher(images)
    finally:
        teacher.eval()
    return logits.float().softmax(dim=1)


class DualTeacherMethod(Method):
    """Dual Teacher: a stochastic-depth student and two EMA teachers that take turns by epoch (§1).

    Log values: ``loss`` (total), ``loss_x``, ``loss_mix``, ``loss_ic`` (unweighted), ``mix_weight`` (mean CutMix
    image weight or the ClassMix scalar ω), ``ic_ratio`` (fraction of teacher pixels at conf ≥ threshold),
    ``mix_fraction`` (fraction of pixels taken from the partner), ``active_teacher`` (1 or 2).
    """

    name: ClassVar[str] = "dual_teacher"
    uses_unlabeled: ClassVar[bool] = True
    log_keys: ClassVar[tuple[str, ...]] = (
        "loss", "loss_x", "loss_mix", "loss_ic", "mix_weight", "ic_ratio", "mix_fraction", "active_teacher",
    )  # fmt: skip

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if cfg.model.drop_path_rate != 0.0:
            raise ConfigError("method 'dual_teacher' sets its student's stochastic depth from "
                              "dual_teacher.drop_path_rate; leave model.drop_path_rate at 0")  # fmt: skip
        self.dt: DualTeacherConfig = cfg.dual_teacher or DualTeacherConfig()
        self.teachers: dict[int, EmaTeacher] = {}
        self.epoch = 0  # the epoch of the latest step: which teacher is active (saved in `state`)

    def teacher(self, k: int) -> EmaTeacher:
        """Teacher `k` (1 or 2)."""
        if k not in self.teachers:
            raise RuntimeError("setup_teachers has not run")
        return self.teachers[k]

    def build_networks(self, new_model: Callable[[], nn.Module]) -> dict[str, nn.Module]:
        """The student, with stochastic depth p_l = linspace(0, dual_teacher.drop_path_rate) over its blocks."""
        student = new_model()
        set_drop_path_rate(student, self.dt.drop_path_rate)
        return {"student": student}

    def setup_teachers(self, networks: Mapping[str, nn.Module], device: torch.device) -> None:
        """Two copies of the freshly built student without stochastic depth; EMA of parameters only (§2 item 7).

        Plain BatchNorm (never SyncBN, as the reference); with several processes every rank keeps rank 0's teacher
        statistics (`after_optimizer_step`), so the teacher evaluated or exported is the same everywhere."""
        for k in TEACHERS:
            module = copy.deepcopy(networks["student"]).to(device)
            set_drop_path_rate(module, 0.0)
            self.teachers[k] = EmaTeacher(module, ema_buffers=False)

    def streams(self, epoch: int) -> tuple[str, ...]:
        return ("labeled", "unlabeled")

    def step(self, forwards: Mapping[str, nn.Module], batches: Mapping[str, Batch], ctx: StepContext) -> StepResult:
        self.epoch = ctx.epoch
        dt, student, gen = self.dt, forwards["student"], ctx.generator
        k = active_teacher(ctx.epoch)
        teacher = self.teacher(k).module
        x, y = batches["labeled"]["image"], batches["labeled"]["label"]
        u = batches["unlabeled"]["image_w"]
        b, _, h, w = u.shape
        tau = dt.conf_threshold
        # the student's drop-path masks come from this iteration's generator (exact resume)
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        set_drop_path_generator(student, torch.Generator().manual_seed(seed))
        # 2. strong view: one colour draw for the whole batch
        image_s = strong_view(u, gen, space=dt.strong_view)
        # 3a / 4a. the active teacher, train mode, no grad
        prob_t = teacher_predictions(teacher, u, ctx.autocast)
        conf_t, pseudo_t = prob_t.max(dim=1)
        if uses_cutmix(ctx.epoch):  # 3. CutMix: Beta(4, 4) box, randperm partners; the receiver keeps its conf
            partners = permutation_partners(b, gen, device=u.device)
            mask = box_mask(sample_beta_boxes(b, h, w, gen).to(u.device), h, w)
            image_mix, pseudo_mix = paste_from_partners(mask, partners, u, pseudo_t)
            conf_own = quantise_conf(conf_t) if dt.quantise_conf else conf_t
            if dt.post_mix_augment:
                image_mix, pseudo_mix, conf_own = post_mix_augment(image_mix, pseudo_mix, conf_own, gen)
            mix_weight = cutmix_image_weights(conf_own, tau)
            mix_fraction = mask.float().mean()
        else:  # 4. ClassMix of the strong views and of the teacher probabilities
            mask = class_mix_mask(pseudo_t, gen)
            partners = permutation_partners(b, gen, swap_pair=True, device=u.device)
            image_mix, prob_mix = class_mix(mask, partners, image_s, prob_t)
            conf_mix, pseudo_mix = prob_mix.max(dim=1)
            mix_weight = classmix_weight(conf_mix, tau)
            mix_fraction = (~mask).float().mean()
        # 3d-e / 4e. one student call on [x; mix]; L_x on x
        with ctx.autocast():
            aux_batch = b if self.cfg.model.aux_labeled_only else None
            logits, logits_aux = student(torch.cat([x, image_mix]), aux_batch=aux_batch)
        loss_x = labeled_loss(logits[:b], logits_aux, y, self.cfg.loss)
        if uses_cutmix(ctx.epoch):
            loss_mix = cutmix_loss(logits[b:], pseudo_mix, mix_weight)
        else:
            loss_mix = classmix_loss(logits[b:], pseudo_mix, mix_weight)
        # 5. implicit consistency: a second teacher forward, the student alone on u_s
        if dt.second_teacher_forward:
            conf_ic, pseudo_ic = teacher_predictions(teacher, u, ctx.autocast).max(dim=1)
        else:
            conf_ic, pseudo_ic = conf_t, pseudo_t
        with ctx.autocast():
            logits_s, _ = student(image_s, with_aux=False)
        target = y if dt.consistency_mask_from_labeled else None
        loss_ic = consistency_loss(logits_s, pseudo_ic, conf_ic, tau, target)
        # 6. total
        loss = loss_x + dt.mix_weight * loss_mix + dt.consistency_weight * loss_ic
        logs = {
            "loss": loss.detach(), "loss_x": loss_x.detach(), "loss_mix": loss_mix.detach(),
            "loss_ic": loss_ic.detach(), "mix_weight": mix_weight.detach().float().mean(),
            "ic_ratio": (conf_ic >= tau).float().mean(), "mix_fraction": mix_fraction,
            "active_teacher": torch.tensor(float(k), device=loss.device),
        }  # fmt: skip
        return StepResult(loss=loss, logs=logs)

    def after_optimizer_step(self, networks: Mapping[str, nn.Module], ctx: StepContext) -> None:
        """7. EMA of the ACTIVE teacher only, alpha = min(1 - 1/(i + 1), cap), i within the epoch; parameters only."""
        i = ctx.step - ctx.epoch * ctx.iters_per_epoch
        teacher = self.teacher(active_teacher(ctx.epoch))
        teacher.update(networks["student"], ema_decay_in_epoch(i, self.dt.ema_decay))
        if ctx.world_size > 1:
            broadcast_buffers(teacher.module)  # per-process BN statistics: every rank keeps rank 0's

    def eval_models(self, networks: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """The student (the reference validates it, §2 item 9), or with ``eval_model: teacher`` the teacher of the
        latest epoch (and the student too with ``eval.student``)."""
        if self.dt.eval_model == "student":
            return {"student": networks["student"]}
        models: dict[str, nn.Module] = {"teacher": self.teacher(active_teacher(self.epoch)).module}
        if self.cfg.eval.student:
            models["student"] = networks["student"]
        return models

    def artifact(self, networks: Mapping[str, nn.Module]) -> tuple[str, nn.Module]:
        if self.dt.eval_model == "student":
            return "student", networks["student"]
        k = active_teacher(self.epoch)
        return f"dual_teacher_{k}", self.teacher(k).module

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"teacher_{k}.{name}": v for k in TEACHERS for name, v in self.teacher(k).state_dict().items()}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        prefixes = tuple(f"teacher_{k}." for k in TEACHERS)
        unknown = sorted(key for key in tensors if not key.startswith(prefixes))
        if unknown:
            raise ValueError(f"method 'dual_teacher' state has unknown tensors: {unknown[:5]}")
        for k, prefix in zip(TEACHERS, prefixes, strict=True):
            own = {key[len(prefix) :]: v for key, v in tensors.items() if key.startswith(prefix)}
            self.teacher(k).load_state_dict(own)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "active_teacher": active_teacher(self.epoch)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"epoch", "active_teacher"}:
            raise ValueError(f"method 'dual_teacher' state must hold epoch and active_teacher, got {sorted(state)}")
        epoch, k = int(state["epoch"]), int(state["active_teacher"])
        if active_teacher(epoch) != k:
            raise ValueError(f"method 'dual_teacher' state: teacher {k} cannot be active in epoch {epoch}")
        self.epoch = epoch
