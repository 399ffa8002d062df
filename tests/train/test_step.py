"""imas_step / supervised_step on the tiny model: batch composition, the 1/2 rule, teacher pseudo-labels, EMA."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from imas_train.config import ImasConfig, LossConfig, ModelConfig
from imas_train.ema import EmaTeacher, ema_decay
from imas_train.imas import confidence_and_labels, easiness
from imas_train.methods.base import StudentForward, step_generator
from imas_train.methods.imas import imas_step
from imas_train.methods.supervised import supervised_step
from imas_train.models import build_model

B, H, W = 2, 33, 41
LOSS = LossConfig(supervised="ce", aux_weight=0.4)
ALWAYS = ImasConfig(tau=0.4, adaptive_cutmix_trigger=False, cutmix_fixed_prob=1.0)  # U in [0, 1) < 1: fires
NEVER = dataclasses.replace(ALWAYS, cutmix_fixed_prob=0.0)


@pytest.fixture
def nets(tiny_model_cfg: ModelConfig) -> tuple[StudentForward, torch.nn.Module]:
    models = []
    for seed in (0, 1):  # a different teacher, so teacher and student pseudo-labels differ
        torch.manual_seed(seed)
        model = build_model(tiny_model_cfg)
        with torch.no_grad():
            model.classifier[-1].weight.mul_(30.0)  # spatially varying predictions from an untrained model
        models.append(model)
    return StudentForward(models[0]).train(), models[1].eval().requires_grad_(False)


def _batches(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batch_l = {"image": torch.randn(B, 3, H, W, generator=g), "label": torch.randint(0, 3, (B, H, W), generator=g)}
    batch_u = {
        "image_w": torch.randn(B, 3, H, W, generator=g),
        "image_s": torch.randn(B, 3, H, W, generator=g),
        "valid": torch.ones(B, H, W, dtype=torch.bool),
        "index": torch.tensor([7, 3]),
    }
    return batch_l, batch_u


def _run(student, teacher, imas: ImasConfig, aux_labeled_only: bool = False, seed: int = 0):
    sizes: list[int] = []
    stem = student.model.backbone.conv1  # called as a module by every forward path
    handle = stem.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    outputs: list[torch.Tensor] = []
    grab = student.register_forward_hook(lambda m, args, out: outputs.append(out[0].detach()))
    batch_l, batch_u = _batches(seed)
    try:
        out = imas_step(student, teacher, batch_l, batch_u, imas=imas, loss=LOSS,
                        generator=step_generator(2, 0, 5), aux_labeled_only=aux_labeled_only)  # fmt: skip
    finally:
        handle.remove()
        grab.remove()
    return out, sizes, outputs[-1], batch_u


@pytest.mark.parametrize(
    ("imas", "fired", "train_batch"),
    [(ALWAYS, True, 4 * B), (NEVER, False, 3 * B),
     (dataclasses.replace(ALWAYS, forward_unused_weak=False), True, 3 * B),
     (dataclasses.replace(NEVER, forward_unused_weak=False), False, 2 * B)],
)  # fmt: skip
def test_student_batch_composition_and_half_rule(nets, imas: ImasConfig, fired: bool, train_batch: int) -> None:
    student, teacher = nets
    out, sizes, _, _ = _run(student, teacher, imas)
    assert sizes == [B, train_batch]  # eval-mode easiness pass on u_w, then ONE train-mode forward
    assert student.training and not teacher.training
    assert bool(out["cutmix_fired"]) is fired
    if fired:
        torch.testing.assert_close(out["loss_u"], 0.5 * (out["loss_mix"] + out["loss_cm"]))
    else:
        assert "loss_cm" not in out
        torch.testing.assert_close(out["loss_u"], out["loss_mix"])  # full weight, not halved
    torch.testing.assert_close(out["loss"].detach(), out["loss_x"] + imas.unsup_weight * out["loss_u"])
    assert out["loss"].requires_grad
    assert out["index"].tolist() == [7, 3]


def test_pseudo_labels_come_from_the_teacher(nets) -> None:
    student, teacher = nets
    _, batch_u = _batches()
    with torch.no_grad():  # before the step: its train-mode forward moves the student's BN running statistics
        logits_t = teacher(batch_u["image_w"])
        logits_s = copy.deepcopy(student.model).eval()(batch_u["image_w"])
    out, _, logits, _ = _run(student, teacher, NEVER)
    e = easiness(logits_s, logits_t, threshold=NEVER.tau)
    torch.testing.assert_close(out["easiness"], e)
    conf_t, pseudo_t = confidence_and_labels(logits_t)
    _, pseudo_s = confidence_and_labels(logits_s)
    assert not torch.equal(pseudo_t, pseudo_s)  # the two models disagree, so the check below is meaningful

    def by_hand(pseudo: torch.Tensor) -> torch.Tensor:  # docs/algorithm.md §6.2, written out
        ce = F.cross_entropy(logits[-B:].float(), pseudo, reduction="none")
        per_image = (ce * (conf_t >= NEVER.tau)).sum((1, 2)) / (H * W)
        return (per_image * e).mean()

    torch.testing.assert_close(out["loss_mix"], by_hand(pseudo_t))
    assert not torch.allclose(out["loss_mix"], by_hand(pseudo_s))


def test_step_leaves_teacher_untouched_and_ema_copies_in_epoch_0(nets) -> None:
    student, teacher = nets
    before = copy.deepcopy(teacher.state_dict())
    out, _, _, _ = _run(student, teacher, ALWAYS)
    out["loss"].backward()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in teacher.parameters())
    torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9).step()
    ema = EmaTeacher(teacher)
    ema.update(student.model, ema_decay(step=3, iters_per_epoch=10, sup_only_epochs=0, alpha=0.996))  # d = 0
    for key, value in student.model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[key], value), key


def test_aux_labeled_only_and_padding_mask(nets) -> None:
    student, teacher = nets
    aux_sizes: list[int] = []
    handle = student.model.aux.register_forward_pre_hook(lambda m, args: aux_sizes.append(args[0].shape[0]))
    _run(student, teacher, NEVER, aux_labeled_only=True)
    handle.remove()
    assert aux_sizes == [B]
    imas = dataclasses.replace(NEVER, ignore_padding_in_unsup=True)
    batch_l, batch_u = _batches()
    batch_u["valid"] = torch.zeros(B, H, W, dtype=torch.bool)  # everything is padding
    out = imas_step(student, teacher, batch_l, batch_u, imas=imas, loss=LOSS,
                    generator=step_generator(2, 0, 5), aux_labeled_only=False)  # fmt: skip
    assert float(out["loss_u"]) == 0.0


def test_supervised_step_is_main_plus_weighted_aux(nets) -> None:
    student, _ = nets
    batch_l, _ = _batches()
    out = supervised_step(student, batch_l, loss=LOSS)
    with torch.no_grad():
        student.train()
        main, aux = student.model.forward_with_aux(batch_l["image"])
    # train-mode BN updated running stats in between, but batch statistics give the same logits
    expected = F.cross_entropy(main, batch_l["label"]) + 0.4 * F.cross_entropy(aux, batch_l["label"])
    torch.testing.assert_close(out["loss_x"], expected)


def test_step_generator_is_a_pure_function_of_seed_rank_step() -> None:
    draw = lambda *key: torch.rand(3, generator=step_generator(*key))  # noqa: E731
    assert torch.equal(draw(2, 0, 17), draw(2, 0, 17))
    assert not torch.equal(draw(2, 0, 17), draw(2, 1, 17))
    assert not torch.equal(draw(2, 0, 17), draw(2, 0, 18))


@pytest.mark.parametrize("forward_unused_weak", [True, False])
def test_cutmix_cuts_from_the_weak_images(nets, forward_unused_weak: bool) -> None:
    """The CutMix branch pastes weak views u_w (docs/algorithm.md §3 step 5), never the strong or intensity-mixed one.

    The strong views are shifted far away from the weak ones, so any strong pixel in u_cm would show; every u_cm
    pixel must equal the weak pixel of the image itself or of its partner at the same position, and both sources
    must occur (the box is pasted).
    """
    student, teacher = nets
    imas = dataclasses.replace(ALWAYS, forward_unused_weak=forward_unused_weak)
    inputs: list[torch.Tensor] = []
    grab = student.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    batch_l, batch_u = _batches(3)
    batch_u["image_s"] = batch_u["image_w"] + 50.0
    try:
        out = imas_step(student, teacher, batch_l, batch_u, imas=imas, loss=LOSS,
                        generator=step_generator(2, 0, 5), aux_labeled_only=False)  # fmt: skip
    finally:
        grab.remove()
    assert float(out["cutmix_fired"]) == 1.0
    train_input = inputs[-1]  # the one train-mode forward: [x; (u_w;) u_cm; u_mix]
    image_cm = train_input[-2 * B : -B]
    weak = batch_u["image_w"]
    own = (image_cm == weak).all(dim=1)  # (B, H, W): pixel from the image itself
    partner = (image_cm == weak.flip(0)).all(dim=1)  # B = 2: the partner is the other image
    assert (own | partner).all()
    assert partner.any() and own.any()
    assert (image_cm < 25.0).all()  # nothing from the strong (+50) views
