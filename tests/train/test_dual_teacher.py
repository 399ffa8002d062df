"""Dual Teacher (shared/methods/DualTeacher.md): the §7 oracles, stochastic depth, and training through the loop."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import imas_train.methods.dual_teacher as dt_module
import imas_train.train
from imas_core.errors import ConfigError
from imas_train.config import ModelConfig, load_config
from imas_train.dual_teacher import (
    active_teacher,
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
from imas_train.methods import METHODS, build_method
from imas_train.methods.base import StepContext, StudentForward
from imas_train.methods.dual_teacher import DualTeacherMethod
from imas_train.mixing import box_mask, class_mix, class_mix_mask, permutation_partners, sample_beta_boxes
from imas_train.models import build_model
from imas_train.models.resnet import BasicBlock, Bottleneck, DropPath, ResNet, set_drop_path_rate
from tests.train.resume_helpers import killed_then_resumed
from tests.train.test_train import REPO, demo_cfg

DT = ("method=dual_teacher", "run.tensorboard=false")


def _ctx(step: int, epoch: int, iters: int) -> StepContext:
    return StepContext(step, epoch, iters, 0, 1, torch.device("cpu"), torch.Generator().manual_seed(step),
                       lambda: torch.autocast("cpu", enabled=False))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# §7 oracles 1-2: the switch and the per-epoch EMA


def test_teachers_switch_by_epoch_parity() -> None:  # oracle 1
    assert [active_teacher(e) for e in range(5)] == [1, 2, 1, 2, 1]
    assert [uses_cutmix(e) for e in range(5)] == [True, False, True, False, True]


def test_ema_decay_restarts_every_epoch() -> None:  # oracle 2
    assert [ema_decay_in_epoch(i) for i in range(3)] == [0.0, 0.5, 1 - 1 / 3]
    assert ema_decay_in_epoch(98) < 0.99 and ema_decay_in_epoch(99) == ema_decay_in_epoch(500) == 0.99


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(2)


def test_only_the_active_teacher_moves_and_step_zero_copies_the_student(tmp_path: Path) -> None:  # oracle 2
    method = DualTeacherMethod(demo_cfg(tmp_path, *DT))
    student = _Tiny()
    method.setup_teachers({"student": student}, torch.device("cpu"))
    t1, t2 = method.teacher(1).module, method.teacher(2).module
    L = 4
    for epoch in (0, 1):
        active, idle = (t1, t2) if epoch == 0 else (t2, t1)
        idle_before = {k: v.clone() for k, v in idle.state_dict().items()}
        buffers_before = active.bn.running_mean.clone()
        for i in range(L):
            with torch.no_grad():
                student.conv.weight.add_(0.1 * (i + 1))
                student.bn.running_mean.add_(1.0)
            before = active.conv.weight.clone()
            method.after_optimizer_step({"student": student}, _ctx(epoch * L + i, epoch, L))
            d = ema_decay_in_epoch(i)
            if i == 0:  # the restart: parameters bit-identical to the student's, buffers stay the teacher's
                assert torch.equal(active.conv.weight, student.conv.weight)
                assert torch.equal(active.conv.bias, student.conv.bias)
            else:
                torch.testing.assert_close(active.conv.weight, d * before + (1 - d) * student.conv.weight)
            assert torch.equal(active.bn.running_mean, buffers_before)
        assert all(torch.equal(v, idle_before[k]) for k, v in idle.state_dict().items())  # bit-identical


# ---------------------------------------------------------------------------------------------------------------
# §7 oracles 3-8: mixing and losses


def test_classmix_picks_half_of_the_classes_and_swaps_pairs() -> None:  # oracle 3
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(4).view(1, 4, 5)  # five classes
    labels = torch.cat([labels, torch.full_like(labels, 3)])  # and an image with one class
    mask = class_mix_mask(labels, g)
    assert torch.unique(labels[0][mask[0]]).numel() == 2  # floor(5 / 2)
    assert not mask[1].any()  # n = 1: nothing chosen
    partners = permutation_partners(2, g, swap_pair=True)
    assert partners.tolist() == [1, 0]
    images = torch.randn(2, 3, 4, 5, generator=g)
    (mixed,) = class_mix(mask, partners, images)
    assert torch.equal(mixed[1], images[0])  # M = 0: entirely the partner


def test_mixed_pseudo_label_is_the_argmax_of_mixed_probabilities() -> None:  # oracle 4
    g = torch.Generator().manual_seed(1)
    prob = torch.randn(3, 4, 6, 7, generator=g).softmax(1)
    labels = prob.argmax(1)
    mask = class_mix_mask(labels, g)
    partners = permutation_partners(3, g, swap_pair=True)
    (q,) = class_mix(mask, partners, prob)
    _, mixed_labels = class_mix(mask, partners, prob.max(1).values, labels)
    assert torch.equal(q.argmax(1), mixed_labels)
    (own,) = class_mix(torch.ones_like(mask), partners, prob)
    assert torch.equal(own.argmax(1), labels)


def test_beta_box_mixed_fraction() -> None:  # oracle 5
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([sample_beta_boxes(8, 512, 512, g) for _ in range(500)])
    fractions = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).double() / 512**2
    assert abs(fractions.mean().item() - 0.36) < 0.02
    assert abs(fractions.quantile(0.1).item() - 0.19) < 0.03 and abs(fractions.quantile(0.9).item() - 0.54) < 0.03
    small = sample_beta_boxes(2, 16, 16, g)
    assert torch.equal(box_mask(small, 16, 16).sum((1, 2)), (small[:, 1] - small[:, 0]) * (small[:, 3] - small[:, 2]))


def test_cutmix_weights_and_quantisation() -> None:  # oracle 6
    ones = torch.ones(2, 4, 4)
    assert cutmix_image_weights(ones, 0.95).tolist() == [1.0, 1.0]
    just_above = torch.full((1, 4, 4), 0.9525)
    assert cutmix_image_weights(quantise_conf(just_above), 0.95).tolist() == [0.0]  # floor(0.9525 * 255) = 242
    assert cutmix_image_weights(just_above, 0.95).tolist() == [1.0]
    assert quantise_conf(torch.tensor([243 / 255])).item() >= 0.95
    # L_mix: every pixel, each image weighted by its own fraction, mean over pixels with CE > 0
    g = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 3, (2, 4, 4), generator=g)
    w = torch.tensor([1.0, 0.25])
    ce = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(cutmix_loss(logits, labels, w), (ce * w.view(2, 1, 1)).mean())


def test_classmix_weight_is_one_scalar_for_the_batch() -> None:  # oracle 7
    g = torch.Generator().manual_seed(3)
    conf = torch.rand(3, 5, 6, generator=g) * 0.1 + 0.9
    permuted = conf.flatten()[torch.randperm(conf.numel(), generator=g)].view_as(conf)
    assert classmix_weight(conf, 0.95).dim() == 0
    assert classmix_weight(conf, 0.95) == classmix_weight(permuted, 0.95)


def test_consistency_loss_mask_and_normaliser() -> None:  # oracle 8
    g = torch.Generator().manual_seed(4)
    logits, labels = torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 3, (2, 4, 4), generator=g)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    assert consistency_loss(logits, labels, torch.full((2, 4, 4), 0.9), 0.95, target).item() == 0.0
    sure = torch.ones(2, 4, 4)
    torch.testing.assert_close(consistency_loss(logits, labels, sure, 0.95, target), F.cross_entropy(logits, labels))
    target[0] = 255  # faithful: the LABELED batch's ignore pattern masks and normalises
    expected = F.cross_entropy(logits[1:], labels[1:])
    torch.testing.assert_close(consistency_loss(logits, labels, sure, 0.95, target), expected)
    torch.testing.assert_close(consistency_loss(logits, labels, sure, 0.95, None), F.cross_entropy(logits, labels))


def test_faithful_strong_view_lies_in_unit_range() -> None:  # oracle 10
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 9, 11, generator=g) * 1.5
    for seed in range(12):
        out = strong_view(images, torch.Generator().manual_seed(seed))
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    pixel = strong_view(images, torch.Generator().manual_seed(0), space="pixel")
    assert pixel.min() < 0  # re-normalised
    again = strong_view(images, torch.Generator().manual_seed(0), space="pixel")
    assert torch.equal(pixel, again)  # every draw from the generator


def test_post_mix_flip_moves_image_label_and_confidence_together() -> None:
    g = torch.Generator().manual_seed(6)
    images = torch.randn(4, 3, 8, 10, generator=g)
    labels = torch.arange(10).expand(4, 8, 10).clone()
    confs = torch.linspace(0, 1, 10).expand(4, 8, 10).clone()
    out_i, out_l, out_c = post_mix_augment(images, labels, confs, torch.Generator().manual_seed(1))
    for k in range(4):
        flipped = bool(out_l[k, 0, 0] == 9)
        assert torch.equal(out_c[k], confs[k].flip(-1) if flipped else confs[k])
    assert out_i.shape == images.shape and torch.isfinite(out_i).all()


# ---------------------------------------------------------------------------------------------------------------
# §7 oracle 9: stochastic depth


@pytest.mark.parametrize("block_type", [BasicBlock, Bottleneck])
def test_drop_path_zeroes_or_scales_the_residual_branch(block_type: type[nn.Module]) -> None:  # oracle 9
    torch.manual_seed(0)
    cin = 8 * block_type.expansion  # type: ignore[attr-defined]
    block = block_type(cin, 8, 1, 1, None)  # type: ignore[call-arg]
    block.drop_path.p, block.drop_path.generator = 0.5, torch.Generator().manual_seed(3)
    seen: dict[str, torch.Tensor] = {}
    block.drop_path.register_forward_hook(lambda _m, i, o: seen.update(branch=i[0], out=o))
    x = torch.randn(16, cin, 5, 5)
    with torch.no_grad():
        y = block(x)
    kept = 0
    for k in range(16):
        if not seen["out"][k].any():  # dropped: the block output is the shortcut
            assert torch.equal(y[k], torch.relu(x[k]))
        else:
            assert torch.equal(seen["out"][k], seen["branch"][k] * 2.0)  # 1 / (1 - p)
            kept += 1
    assert 0 < kept < 16
    block.eval()
    t = torch.randn(2, cin, 3, 3)
    assert block.drop_path(t) is t  # eval mode: identity


def test_drop_path_rates_follow_linspace_over_the_blocks() -> None:
    net = ResNet(depth=18, layers=(1, 2, 1, 1), base_width=8, multi_grid=False, drop_path_rate=0.1)
    rates = [m.p for m in net.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 5).tolist())
    set_drop_path_rate(net, 0.0)
    assert all(m.p == 0.0 for m in net.modules() if isinstance(m, DropPath))


def test_exported_model_does_not_depend_on_drop_path(tiny_model_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    plain = build_model(tiny_model_cfg)
    stochastic = build_model(dataclasses.replace(tiny_model_cfg, drop_path_rate=0.3))
    assert plain.state_dict().keys() == stochastic.state_dict().keys()
    stochastic.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), stochastic.eval()(x))


# ---------------------------------------------------------------------------------------------------------------
# The method


def test_cutmix_receiver_keeps_its_own_confidence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # 5
    cfg = demo_cfg(tmp_path, *DT, "dual_teacher.post_mix_augment=false", "dual_teacher.quantise_conf=false")
    method = build_method(cfg)
    torch.manual_seed(0)
    networks = method.build_networks(lambda: build_model(cfg.model))
    method.setup_teachers(networks, torch.device("cpu"))
    seen: dict[str, torch.Tensor] = {}
    real = dt_module.cutmix_image_weights

    def spy(conf: torch.Tensor, threshold: float) -> torch.Tensor:
        seen["conf"] = conf
        return real(conf, threshold)

    monkeypatch.setattr(dt_module, "cutmix_image_weights", spy)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 3, 33, 33, generator=g)
    batches = {"labeled": {"image": torch.randn(4, 3, 33, 33, generator=g), "label": torch.zeros(4, 33, 33).long()},
               "unlabeled": {"image_w": u}}  # fmt: skip
    out = method.step({"student": StudentForward(networks["student"]).train()}, batches, _ctx(0, 0, 10))
    own = dt_module.teacher_predictions(method.teacher(1).module, u, lambda: torch.autocast("cpu", enabled=False))
    assert torch.equal(seen["conf"], own.max(1).values)  # not pasted from the partner
    assert out.logs["active_teacher"].item() == 1.0 and torch.isfinite(out.loss)
    assert set(out.logs) <= set(method.log_keys)
    assert not method.teacher(1).module.training  # back in eval mode


def test_method_registration_sections_and_artifact(tmp_path: Path) -> None:
    cfg = demo_cfg(tmp_path, *DT)
    assert METHODS["dual_teacher"] is DualTeacherMethod and cfg.dual_teacher is None  # defaults when absent
    method = build_method(cfg)
    assert method.streams(3) == ("labeled", "unlabeled")
    nets = {"student": nn.Linear(1, 1)}
    assert method.artifact(nets) == ("student", nets["student"]) and list(method.eval_models(nets)) == ["student"]
    with pytest.raises(ConfigError, match="dual_teacher.drop_path_rate"):
        demo_cfg(tmp_path, *DT, "model.drop_path_rate=0.1")
    with pytest.raises(ConfigError, match="not used with method 'imas'"):
        demo_cfg(tmp_path, "model.drop_path_rate=0.1")
    assert demo_cfg(tmp_path, "method=supervised", "model.drop_path_rate=0.1").model.drop_path_rate == 0.1
    with pytest.raises(ConfigError, match="dual_teacher.conf_threshold"):
        demo_cfg(tmp_path, *DT, "dual_teacher.conf_threshold=0")


def test_shipped_dual_teacher_configs() -> None:
    paths = sorted((REPO / "configs").glob("*dual_teacher*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        cfg = load_config(path)
        t = cfg.dual_teacher
        assert cfg.method == "dual_teacher" and t is not None and cfg.model.drop_path_rate == 0.0
        assert (t.drop_path_rate, t.ema_decay, t.conf_threshold, t.mix_weight, t.consistency_weight) == (
            0.1, 0.99, 0.95, 1.0, 0.2,
        )  # fmt: skip
        assert cfg.model.depth == 50 and "ASSUMPTION" in path.read_text()


# ---------------------------------------------------------------------------------------------------------------
# Through the real loop


def test_trains_exports_and_resumes_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imas_train.teacher_artifact import load_teacher

    settings = (*DT, "run.checkpoint_every=1", "run.keep_checkpoints=4")
    full = imas_train.train.train(demo_cfg(tmp_path / "full", *settings))
    assert full.iterations == 4  # epochs 0 (teacher 1, CutMix) and 1 (teacher 2, ClassMix)
    model, meta = load_teacher(full.teacher_path)
    assert meta.training_summary["method"] == "dual_teacher" and meta.training_summary["artifact_model"] == "student"
    assert meta.model_config["drop_path_rate"] == 0.0 and not model.training
    state = tmp_path / "full" / "state" / "step-00000004"
    assert json.loads((state / "method_state.json").read_text()) == {"epoch": 1, "active_teacher": 2}

    cfg = demo_cfg(tmp_path / "split", *settings)
    resumed = killed_then_resumed(cfg, monkeypatch, at=3)  # mid-epoch 1
    assert resumed.iterations == 4 and resumed.miou_final == full.miou_final
    assert (tmp_path / "split" / "teacher.safetensors").read_bytes() == full.teacher_path.read_bytes()
    a = load_file(str(state / "method_state.safetensors"))
    b = load_file(str(tmp_path / "split" / "state" / "step-00000004" / "method_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # both teachers, bitwise
    assert any(k.startswith("teacher_1.") for k in a) and any(k.startswith("teacher_2.") for k in a)


def test_teacher_selection_follows_the_latest_epoch_and_state_is_checked(tmp_path: Path) -> None:
    method = DualTeacherMethod(demo_cfg(tmp_path, *DT, "dual_teacher.eval_model=teacher", "eval.student=true"))
    student = _Tiny()
    method.setup_teachers({"student": student}, torch.device("cpu"))
    method.load_state({"epoch": 3, "active_teacher": 2})
    assert method.artifact({"student": student}) == ("dual_teacher_2", method.teacher(2).module)
    assert list(method.eval_models({"student": student})) == ["teacher", "student"]
    assert method.state() == {"epoch": 3, "active_teacher": 2}
    with pytest.raises(ValueError, match="teacher 1 cannot be active in epoch 3"):
        method.load_state({"epoch": 3, "active_teacher": 1})
