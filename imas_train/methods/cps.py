"""``method: cps``: CPS, Cross Pseudo Supervision (Chen et al., CVPR 2021), as its official code behaves.

Specification: ``shared/methods/CPS.md`` (cited as ``CPS.md §N``) and ``shared/methods/README.md`` §3. Two networks
f1, f2 of the same architecture (same backbone init, independently drawn heads) train jointly, each with its own
optimizer; no EMA, no teacher. Each network's hard argmax on unlabeled images supervises the other with
cross-entropy. With CutMix (the reported configuration, CPS.md §2.A), pseudo-labels come from TRAIN-mode no-grad
forwards of two clean unlabeled batches u0, u1 (streams ``unlabeled`` and ``unlabeled_mix``), whose logits are mixed
with a three-box toggled mask before the argmax; the networks learn on the equally mixed image. Plain CPS
(CPS.md §2.C, ``cps.cutmix: false``) uses one unlabeled batch and supervises labeled and unlabeled pixels alike.
Only f1 is evaluated for model selection and exported (CPS.md §2.E).

Every forward is a separate call in the reference's order, so each uses its own batch statistics and moves the
running statistics in that order (per network: u0, u1, u_mix, x with CutMix; x, u without). The reference
all-reduces every loss term before backward, which autograd does not see: the total is multiplied by
1/``cps.reference_world_size`` here instead, never by a collective (CPS.md §2.A item 9, README.md §3 item 1).

Vocabulary: ``_l`` labeled, ``_u0``/``_u1`` the two unlabeled batches, ``_mix`` the mixed image, ``_1``/``_2`` the
network (f1, f2); ``pseudo_k`` is f_k's hard pseudo-label, which supervises the OTHER network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from imas_core.constants import IGNORE_INDEX
from imas_core.errors import ConfigError
from imas_train.config import CpsConfig, LossConfig, TrainConfig
from imas_train.losses import cross_entropy
from imas_train.methods.base import Autocast, Batch, Method, StepContext, StepResult, broadcast_buffers
from imas_train.methods.supervised import labeled_loss
from imas_train.mixing import mask_mix, sample_cps_boxes, toggled_box_mask

__all__ = [
    "CpsMethod",
    "cps_cutmix_step",
    "cps_loss",
    "cps_plain_step",
    "cps_pseudo_labels",
    "cps_total",
    "init_head_kaiming",
    "no_decay_param_groups",
]


# ---------------------------------------------------------------------------------------------------------------
# Pure functions of the math


def cps_pseudo_labels(logits_u0: Tensor, logits_u1: Tensor, mask: Tensor) -> Tensor:
    """One network's pseudo-label of the mixed image: argmax of its MIXED logits (CPS.md §2.A item 4).

    ŷ = argmax(f(u0)·(1 − M) + f(u1)·M). The mask is binary, so mixing the logits then taking the argmax equals
    mixing the two argmaxes (CPS.md §7 oracle 4); no confidence threshold, no ignore label.

    Args:
        logits_u0, logits_u1: (B, C, H, W) logits of the same network on u0 and u1.
        mask: (B, H, W) bool, True where the pixel comes from u1 (`toggled_box_mask`).

    Returns:
        (B, H, W) int64 class indices.
    """
    return mask_mix(mask, logits_u1.float(), logits_u0.float()).argmax(dim=1)


def cps_loss(
    logits_1: Tensor,
    logits_2: Tensor,
    pseudo_1: Tensor,
    pseudo_2: Tensor,
    valid: Tensor | None = None,
) -> Tensor:
    """L_cps = CE(p1, ŷ2) + CE(p2, ŷ1): each network learns the OTHER one's hard labels (CPS.md §2.A item 6).

    Each CE is the mean over all B·H·W pixels (pseudo-labels have no ignore pixels). Symmetric: swapping the two
    networks leaves it unchanged (CPS.md §7 oracle 1).

    Args:
        logits_1, logits_2: (B, C, H, W) logits with grad of f1 and f2 on the same images.
        pseudo_1, pseudo_2: (B, H, W) int64 hard labels from f1 and f2 (no grad).
        valid: optional (B, H, W) bool; False pixels are left out of both means (``cps.ignore_padding_in_unsup``).

    Returns:
        Scalar float32 (the sum of the two means).
    """
    if valid is not None:
        pseudo_1 = pseudo_1.masked_fill(~valid, IGNORE_INDEX)
        pseudo_2 = pseudo_2.masked_fill(~valid, IGNORE_INDEX)
    return cross_entropy(logits_1, pseudo_2) + cross_entropy(logits_2, pseudo_1)


def cps_total(
    loss_sup_1: Tensor,
    loss_sup_2: Tensor,
    loss_cps: Tensor,
    *,
    cps_weight: float,
    reference_world_size: int,
) -> Tensor:
    """The loss backward sees: (L_sup,1 + L_sup,2 + cps_weight·L_cps) / W_ref (CPS.md §2.A items 8-9).

    The reference all-reduces each term and divides by W before backward; the collective is invisible to autograd,
    so every gradient is 1/W of the usual data-parallel one. The explicit factor 1/W_ref reproduces that on any
    number of processes (README.md §3 item 1); W_ref = 1 gives ordinary gradients. Weight decay is not scaled (it is
    the optimizer's).
    """
    if reference_world_size < 1:
        raise ValueError(f"reference_world_size must be >= 1, got {reference_world_size}")
    return (loss_sup_1 + loss_sup_2 + cps_weight * loss_cps) / reference_world_size


@torch.no_grad()
def init_head_kaiming(model: nn.Module) -> None:
    """Re-draw every non-backbone conv as Kaiming-normal (fan_in, ReLU gain), BN γ = 1, β = 0 (CPS.md §3 head init).

    Conv biases keep PyTorch's default draw. Draws from torch's global generator, so two successive calls on two
    models give two different heads; the backbone (``model.backbone``) is not touched.
    """
    for name, child in model.named_children():
        if name == "backbone":
            continue
        for module in child.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def no_decay_param_groups(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split each optimizer group into a decayed part and a ``<name>_no_decay`` part with weight_decay = 0.

    The reference decays conv and linear weights only: every BatchNorm weight and bias and every bias goes to a
    group without decay (CPS.md §3 optimizer, §7 oracle 8). Every other key of a group (lr, base_lr) is kept.

    Args:
        model: the network whose parameters `groups` hold.
        groups: parameter groups as `imas_train.optim.param_groups` builds them.

    Returns:
        New groups, in order: for each input group the decayed part, then its no-decay part (empty parts dropped).
    """
    no_decay: set[int] = set()
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or pname == "bias":
                no_decay.add(id(param))
    out: list[dict[str, Any]] = []
    for group in groups:
        decayed = [p for p in group["params"] if id(p) not in no_decay]
        kept = [p for p in group["params"] if id(p) in no_decay]
        if decayed:
            out.append({**group, "params": decayed})
        if kept:
            out.append({**group, "name": f"{group['name']}_no_decay", "params": kept, "weight_decay": 0.0})
    return out


# ---------------------------------------------------------------------------------------------------------------
# One iteration


def _step_outputs(
    loss_sup_1: Tensor, loss_sup_2: Tensor, loss_cps: Tensor, pseudo_1: Tensor, pseudo_2: Tensor, cps: CpsConfig
) -> dict[str, Tensor]:
    """The total (scaled by 1/W_ref, §2.A items 8-9) and the logged values shared by both CPS variants."""
    total = cps_total(loss_sup_1, loss_sup_2, loss_cps, cps_weight=cps.cps_weight,
                      reference_world_size=cps.reference_world_size)  # fmt: skip
    return {
        "loss": total,
        "loss_total": (loss_sup_1 + loss_sup_2 + cps.cps_weight * loss_cps).detach(),
        "loss_sup_1": loss_sup_1.detach(),
        "loss_sup_2": loss_sup_2.detach(),
        "loss_cps": loss_cps.detach(),
        "agreement": (pseudo_1 == pseudo_2).float().mean(),
    }


def cps_cutmix_step(
    net_1: nn.Module,
    net_2: nn.Module,
    batch_l: Batch,
    batch_u0: Batch,
    batch_u1: Batch,
    *,
    cps: CpsConfig,
    loss: LossConfig,
    generator: torch.Generator,
    autocast: Autocast = nullcontext,
) -> dict[str, Tensor]:
    """Forward and losses of one CPS + CutMix iteration (CPS.md §2.A items 1-8); no backward, no optimizer step.

    Forward calls, in this order, all in train mode: no-grad f1(u0), f1(u1), f2(u0), f2(u1); with grad f1(u_mix),
    f2(u_mix), f1(x), f2(x). Each is its own call, so each normalises with its own batch statistics and updates the
    running statistics (CPS.md §2.A item 3, §8).

    Args:
        net_1, net_2: `StudentForward` modules (possibly prepared) of f1 and f2, in train mode.
        batch_l: {"image": (B, 3, H, W), "label": (B, H, W)} on the device.
        batch_u0, batch_u1: two independent unlabeled batches {"image_w": (B, 3, H, W), "valid": (B, H, W)};
            "image_s" is not used.
        cps: method settings.
        loss: supervised loss settings (OHEM or CE, CPS.md §2.A item 7).
        generator: this iteration's CPU generator: the boxes (`sample_cps_boxes`) are its only draws.
        autocast: context manager for every forward; losses are float32.

    Returns:
        "loss" (scalar with grad, `cps_total`), detached "loss_total" (the same before the 1/W_ref factor),
        "loss_sup_1", "loss_sup_2", "loss_cps", "mix_fraction" (mean of the mask), "agreement" (fraction of pixels
        where the two pseudo-labels agree).
    """
    image_l, label_l = batch_l["image"], batch_l["label"]
    image_u0, image_u1 = batch_u0["image_w"], batch_u1["image_w"]
    b, _, h, w = image_u0.shape

    # 1-2. three toggled boxes per image (True = pixel from u1), and the mixed image
    boxes = sample_cps_boxes(b, h, w, generator, n_boxes=cps.n_boxes, prop_range=cps.box_prop_range)
    mask = toggled_box_mask(boxes.to(image_u0.device), h, w)
    image_mix = mask_mix(mask, image_u1, image_u0)

    # 3. pseudo-label forwards: no grad, TRAIN mode (batch statistics, running statistics move), four calls
    with torch.no_grad(), autocast():
        logits_1_u0, _ = net_1(image_u0, with_aux=False)
        logits_1_u1, _ = net_1(image_u1, with_aux=False)
        logits_2_u0, _ = net_2(image_u0, with_aux=False)
        logits_2_u1, _ = net_2(image_u1, with_aux=False)

    # 4. mix the logits with the same mask, then argmax
    pseudo_1 = cps_pseudo_labels(logits_1_u0, logits_1_u1, mask)
    pseudo_2 = cps_pseudo_labels(logits_2_u0, logits_2_u1, mask)

    # 5-6. student forwards on the mixed image; each network learns the other's labels
    with autocast():
        logits_1_mix, _ = net_1(image_mix, with_aux=False)
        logits_2_mix, _ = net_2(image_mix, with_aux=False)
    valid = mask_mix(mask, batch_u1["valid"], batch_u0["valid"]) if cps.ignore_padding_in_unsup else None
    loss_cps = cps_loss(logits_1_mix, logits_2_mix, pseudo_1, pseudo_2, valid)

    # 7. supervised forwards, one call per network (aux head on them when the model has one)
    with autocast():
        logits_1_l, aux_1 = net_1(image_l)
        logits_2_l, aux_2 = net_2(image_l)
    loss_sup_1 = labeled_loss(logits_1_l, aux_1, label_l, loss)
    loss_sup_2 = labeled_loss(logits_2_l, aux_2, label_l, loss)

    # 8-9. total, scaled by 1/W_ref
    out = _step_outputs(loss_sup_1, loss_sup_2, loss_cps, pseudo_1, pseudo_2, cps)
    out["mix_fraction"] = mask.float().mean()
    return out


def cps_plain_step(
    net_1: nn.Module,
    net_2: nn.Module,
    batch_l: Batch,
    batch_u: Batch,
    *,
    cps: CpsConfig,
    loss: LossConfig,
    autocast: Autocast = nullcontext,
) -> dict[str, Tensor]:
    """Forward and losses of one plain-CPS iteration, without CutMix (CPS.md §2.C).

    Four forwards with grad, in this order: f1(x), f1(u), f2(x), f2(u). P_k = [f_k(x); f_k(u)] (2B images);
    L_cps = CE(P1, argmax P2) + CE(P2, argmax P1) over labeled AND unlabeled pixels (the labeled pixels are
    supervised by the other network's argmax too). The supervised losses use the labeled slices of the same
    forwards.

    Args:
        net_1, net_2: `StudentForward` modules of f1 and f2, in train mode.
        batch_l: {"image", "label"}; batch_u: {"image_w", "valid"} ("image_s" unused).
        cps: method settings; with ``ignore_padding_in_unsup`` the unlabeled padding is left out of L_cps (the
            labeled images keep every pixel: their batches carry no padding marker).
        loss: supervised loss settings.
        autocast: context manager for every forward.

    Returns:
        As `cps_cutmix_step`, without "mix_fraction".
    """
    image_l, label_l, image_u = batch_l["image"], batch_l["label"], batch_u["image_w"]
    with autocast():
        logits_1_l, aux_1 = net_1(image_l)
        logits_1_u, _ = net_1(image_u, with_aux=False)
        logits_2_l, aux_2 = net_2(image_l)
        logits_2_u, _ = net_2(image_u, with_aux=False)
    logits_1 = torch.cat([logits_1_l, logits_1_u])
    logits_2 = torch.cat([logits_2_l, logits_2_u])
    pseudo_1 = logits_1.detach().float().argmax(dim=1)
    pseudo_2 = logits_2.detach().float().argmax(dim=1)
    valid = None
    if cps.ignore_padding_in_unsup:
        valid = torch.cat([torch.ones_like(label_l, dtype=torch.bool), batch_u["valid"]])
    loss_cps = cps_loss(logits_1, logits_2, pseudo_1, pseudo_2, valid)
    loss_sup_1 = labeled_loss(logits_1_l, aux_1, label_l, loss)
    loss_sup_2 = labeled_loss(logits_2_l, aux_2, label_l, loss)
    return _step_outputs(loss_sup_1, loss_sup_2, loss_cps, pseudo_1, pseudo_2, cps)


# ---------------------------------------------------------------------------------------------------------------
# The method


class CpsMethod(Method):
    """CPS: two networks f1, f2 supervise each other; f1 is model-selected and exported (CPS.md §1, §2.E).

    Log values: ``loss`` is the total as the reference reports it (before the 1/W_ref factor that backward sees);
    ``loss_sup_1``, ``loss_sup_2``, ``loss_cps`` (unweighted); ``mix_fraction`` (CutMix only); ``agreement``.
    """

    name: ClassVar[str] = "cps"
    uses_unlabeled: ClassVar[bool] = True
    log_keys: ClassVar[tuple[str, ...]] = (
        "loss", "loss_sup_1", "loss_sup_2", "loss_cps", "mix_fraction", "agreement",
    )  # fmt: skip
    network_names: ClassVar[tuple[str, str]] = ("f1", "f2")

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if cfg.cps is None:
            raise ConfigError("method 'cps' needs a cps: section (cps_weight, reference_world_size)")
        self.cps: CpsConfig = cfg.cps

    def build_networks(self, new_model: Callable[[], nn.Module]) -> dict[str, nn.Module]:
        """f1 and f2: the same backbone init (the pretrained file; f1's draw when there is none), own heads.

        CPS.md §1: the networks differ by the random initialisation of their heads; the reference loads the same
        ImageNet file into both backbones. Without a pretrained file, f2's backbone is set to f1's so that this
        still holds. With ``cps.head_init: kaiming_fan_in`` each head is redrawn as the reference does (§3).
        """
        nets = {}
        for name in self.network_names:
            model = new_model()
            if self.cps.head_init == "kaiming_fan_in":
                init_head_kaiming(model)
            nets[name] = model
        f1, f2 = (nets[n] for n in self.network_names)
        backbone_1, backbone_2 = getattr(f1, "backbone", None), getattr(f2, "backbone", None)
        if isinstance(backbone_1, nn.Module) and isinstance(backbone_2, nn.Module):
            backbone_2.load_state_dict(backbone_1.state_dict())
        return nets

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """The reference's groups: BN parameters and biases without weight decay (§3, §7 oracle 8)."""
        return no_decay_param_groups(model, super().param_groups(model, lr))

    def streams(self, epoch: int) -> tuple[str, ...]:
        """Two independent unlabeled passes with CutMix (u0, u1; CPS.md §2.A item 1), one without (§2.C)."""
        return ("labeled", "unlabeled", "unlabeled_mix") if self.cps.cutmix else ("labeled", "unlabeled")

    def step(self, forwards: Mapping[str, nn.Module], batches: Mapping[str, Batch], ctx: StepContext) -> StepResult:
        net_1, net_2 = (forwards[n] for n in self.network_names)
        if self.cps.cutmix:
            out = cps_cutmix_step(net_1, net_2, batches["labeled"], batches["unlabeled"], batches["unlabeled_mix"],
                                  cps=self.cps, loss=self.cfg.loss, generator=ctx.generator,
                                  autocast=ctx.autocast)  # fmt: skip
        else:
            out = cps_plain_step(net_1, net_2, batches["labeled"], batches["unlabeled"], cps=self.cps,
                                 loss=self.cfg.loss, autocast=ctx.autocast)  # fmt: skip
        logs = {k: out[k] for k in self.log_keys if k in out and k != "loss"}
        logs["loss"] = out["loss_total"]
        return StepResult(loss=out["loss"], logs=logs)

    def after_optimizer_step(self, networks: Mapping[str, nn.Module], ctx: StepContext) -> None:
        """Multi-process CPU runs have no SyncBN: give every rank rank 0's BN statistics, so that each rank evaluates
        the same f1 (DDP copies rank 0's buffers at the next forward anyway, so training is unchanged)."""
        if ctx.world_size > 1 and ctx.device.type != "cuda":
            for name in self.network_names:
                broadcast_buffers(networks[name])

    def eval_models(self, networks: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """f1 (selected and exported, CPS.md §2.E), and f2 too with ``cps.eval_f2``."""
        f1, f2 = self.network_names
        models = {f1: networks[f1]}
        if self.cps.eval_f2:
            models[f2] = networks[f2]
        return models

    def artifact(self, networks: Mapping[str, nn.Module]) -> tuple[str, nn.Module]:
        return "cps_f1", networks[self.network_names[0]]
