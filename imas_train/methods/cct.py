"""``method: cct``: Cross-Consistency Training (Ouali et al., CVPR 2020) as its DeepLabV3+ port runs it.

Specification: ``shared/methods/CCT.md`` (cited as ``CCT.md §N``) and ``shared/methods/README.md`` §3. One
segmentation network (encoder h = backbone + ASPP + the classifier's 3x3 blocks; main decoder g = the classifier's
final 1x1 conv + bilinear resize) and K auxiliary decoders g_a^k, each reading a differently perturbed copy of the
encoder output z_u of the unlabeled images (`imas_train.models.cct_decoders`). One iteration (CCT.md §2.B):

1. ŷ_l = g(h(x)); L_s = abCE(ŷ_l, y) (or the ``loss:`` section's CE/OHEM with ``cct.supervised: loss``).
2. z_u = h(u) (a separate call: its own batch statistics); ŷ_u = g(z_u); target q = softmax(ŷ_u) DETACHED.
3. o_k = g_a^k(P_k(z_u)), the guided perturbations reading argmax(ŷ_u) (detached).
4. L_u = (1/K)·Σ_k MSE(softmax(o_k), q); the encoder learns from it, the main decoder never does.
5. L = (L_s + w_u(t)·L_u) / W_ref: the port all-reduces its terms before backward, which autograd does not see, so
   every gradient is 1/W of the usual one; reproduced by the explicit factor (methods/README.md §3 item 1).

The auxiliary decoders are a second trained network (``aux_decoders``, its own SGD optimizer at the head LR), never
evaluated, never in the artifact: the exported model is the plain segmentation network (CCT.md §5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from imas_core.constants import IGNORE_INDEX
from imas_core.errors import ConfigError
from imas_train.cct import abce_tau, annealed_bootstrap_ce, softmax_mse, unsup_weight
from imas_train.config import CctConfig, TrainConfig
from imas_train.methods.base import Batch, Method, StepContext, StepResult, broadcast_buffers
from imas_train.methods.cps import no_decay_param_groups
from imas_train.methods.supervised import labeled_loss
from imas_train.models.cct_decoders import PERTURBATIONS, CctAuxDecoders, PerturbationSettings

__all__ = ["AuxForward", "CctForward", "CctMethod", "cct_total", "decoder_kinds"]

AUX = "aux_decoders"  # the auxiliary decoders' network name


def decoder_kinds(cct: CctConfig) -> tuple[str, ...]:
    """The perturbation of each auxiliary decoder, in the official order (`PERTURBATIONS`) with the config's
    counts."""
    return tuple(kind for kind in PERTURBATIONS for _ in range(int(getattr(cct, kind))))


def cct_total(loss_sup: Tensor, loss_unsup: Tensor, weight: float, reference_world_size: int) -> Tensor:
    """(L_s + w_u·L_u) / W_ref, the loss backward sees (CCT.md §2.B items 5-6)."""
    if reference_world_size < 1:
        raise ValueError(f"reference_world_size must be >= 1, got {reference_world_size}")
    return (loss_sup + weight * loss_unsup) / reference_world_size


class CctForward(nn.Module):
    """The module Accelerate prepares around the segmentation network: ``forward(x, with_aux) -> (logits,
    features, aux | None)`` (`DeepLabV3Plus.forward_with_features`); never exported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, with_aux: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        out: tuple[Tensor, Tensor, Tensor | None] = self.model.forward_with_features(x, with_aux)
        return out


class AuxForward(nn.Module):
    """The module Accelerate prepares around the auxiliary decoders (``.model`` is the `CctAuxDecoders`)."""

    def __init__(self, model: CctAuxDecoders) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor, main_logits: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
        out: tuple[Tensor, ...] = self.model(z, main_logits, generator)
        return out


class CctMethod(Method):
    """CCT (CCT.md): one network plus K training-only auxiliary decoders; the network is evaluated and exported.

    Log values: ``loss`` (L_s + w_u·L_u, before the 1/W_ref factor), ``loss_sup``, ``loss_unsup`` (unweighted),
    ``unsup_weight`` (w_u), ``sup_kept_ratio`` (abCE: fraction of valid labeled pixels kept), ``sup_threshold``
    (abCE's threshold).
    """

    name: ClassVar[str] = "cct"
    uses_unlabeled: ClassVar[bool] = True
    log_keys: ClassVar[tuple[str, ...]] = (
        "loss", "loss_sup", "loss_unsup", "unsup_weight", "sup_kept_ratio", "sup_threshold",
    )  # fmt: skip

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if cfg.cct is None:
            raise ConfigError("method 'cct' needs a cct: section (at least reference_world_size)")
        self.cct: CctConfig = cfg.cct
        self.kinds = decoder_kinds(cfg.cct)
        if not self.kinds:
            raise ConfigError("cct: at least one auxiliary decoder is needed (all decoder counts are 0)")

    def build_networks(self, new_model: Callable[[], nn.Module]) -> dict[str, nn.Module]:
        """The segmentation network, then the K auxiliary decoders on its ``decoder_channels`` features."""
        c = self.cct
        settings = PerturbationSettings(
            drop_rate=c.drop_rate, erase=c.erase, cutout_min_vertices=c.cutout_min_vertices, vat_xi=c.vat_xi,
            vat_eps=c.vat_eps, noise_amplitude=c.noise_amplitude, feature_drop_range=c.feature_drop_range,
        )  # fmt: skip
        student = new_model()
        decoders = CctAuxDecoders(self.kinds, self.cfg.model.decoder_channels, self.cfg.model.num_classes, settings)
        return {"student": student, AUX: decoders}

    def forward_adaptor(self, model: nn.Module) -> nn.Module:
        return AuxForward(model) if isinstance(model, CctAuxDecoders) else CctForward(model)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Backbone and head groups of the network; the auxiliary decoders form one group at the head LR (CCT.md
        §5 "Param group: aux decoders with the head"). With ``no_decay_bn_bias`` (the port) BN parameters and
        biases have no weight decay."""
        o = self.cfg.optim
        if isinstance(model, CctAuxDecoders):
            head_lr = lr * o.head_lr_mult
            params = [p for p in model.parameters() if p.requires_grad]
            groups = [{"name": "head", "params": params, "lr": head_lr, "base_lr": head_lr,
                       "weight_decay": o.weight_decay}]  # fmt: skip
        else:
            groups = super().param_groups(model, lr)
        return no_decay_param_groups(model, groups) if self.cct.no_decay_bn_bias else groups

    def step(self, forwards: Mapping[str, nn.Module], batches: Mapping[str, Batch], ctx: StepContext) -> StepResult:
        c, cfg = self.cct, self.cfg
        student, aux = forwards["student"], forwards[AUX]
        x, y = batches["labeled"]["image"], batches["labeled"]["label"]
        u = batches["unlabeled"]["image_w"]
        # 1. supervised branch
        with ctx.autocast():
            logits_l, _, aux_l = student(x)
        logs: dict[str, Tensor] = {}
        if c.supervised == "abce":
            total = cfg.optim.epochs * ctx.iters_per_epoch
            tau = abce_tau(ctx.step + 1, int(c.abce_anneal_fraction * total), cfg.model.num_classes,
                           c.abce_final_threshold)  # fmt: skip
            min_kept = c.abce_min_kept_per_image * x.shape[0]
            loss_sup, threshold, kept = annealed_bootstrap_ce(logits_l, y, tau, min_kept)
            if aux_l is not None:
                loss_sup = loss_sup + cfg.loss.aux_weight * annealed_bootstrap_ce(aux_l, y, tau, min_kept)[0]
            logs["sup_threshold"] = threshold.detach().float()
            logs["sup_kept_ratio"] = kept.float() / (y != IGNORE_INDEX).sum().clamp_min(1).float()
        else:
            loss_sup = labeled_loss(logits_l, aux_l, y, cfg.loss)
        # 2. unsupervised branch: a separate encoder call; the target carries no gradient
        with ctx.autocast():
            logits_u, z_u, _ = student(u, with_aux=False)
        target = logits_u.detach().float().softmax(dim=1)
        # 3-4. the K perturbed auxiliary decoders and their consistency with the target
        with ctx.autocast():
            outputs = aux(z_u, logits_u.detach(), ctx.generator)
        valid = batches["unlabeled"]["valid"] if c.ignore_padding_in_unsup else None
        loss_unsup = torch.stack([softmax_mse(o, target, valid) for o in outputs]).mean()
        # 5. total, the port's 1/W_ref gradient scale
        rampup = c.rampup_epochs * ctx.iters_per_epoch
        weight = unsup_weight(ctx.step, rampup, c.unsup_weight)
        loss = cct_total(loss_sup, loss_unsup, weight, c.reference_world_size)
        logs.update({
            "loss": (loss_sup + weight * loss_unsup).detach(), "loss_sup": loss_sup.detach(),
            "loss_unsup": loss_unsup.detach(), "unsup_weight": torch.tensor(weight),
        })  # fmt: skip
        return StepResult(loss=loss, logs=logs)

    def after_optimizer_step(self, networks: Mapping[str, nn.Module], ctx: StepContext) -> None:
        """Multi-process CPU runs have no SyncBN: every rank keeps rank 0's BN statistics, so that each rank
        evaluates and exports the same network (as CPS)."""
        if ctx.world_size > 1 and ctx.device.type != "cuda":
            broadcast_buffers(networks["student"])

    def eval_models(self, networks: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """The segmentation network only: the auxiliary decoders are training-only."""
        return {"student": networks["student"]}

    def artifact(self, networks: Mapping[str, nn.Module]) -> tuple[str, nn.Module]:
        return "student", networks["student"]
