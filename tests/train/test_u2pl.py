"""U2PL: the specification's test oracles (shared/methods/U2PL.md §7), the method through the real loop, and an
exactly resumable run (memory bank included)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from imas_train.config import load_config
from imas_train.memory_bank import MemoryBank
from imas_train.methods.base import StepContext
from imas_train.methods.u2pl import U2plMethod
from imas_train.u2pl import (
    ContrastSettings,
    batch_onehot,
    contrast_pairs,
    contrastive_loss,
    drop_percent,
    entropy_filter,
    filtered_pseudo_loss,
    info_nce,
)
from tests.train.test_train import demo_cfg

U2PL = [
    "method=u2pl", "u2pl.sup_only_epochs=0", "u2pl.reference_world_size=4", "u2pl.num_anchors=16",
    "u2pl.num_negatives=8", "u2pl.bank_size=200", "u2pl.bank_size_class0=300", "model.rep_channels=16",
    "u2pl.ema_buffers=false",
]  # fmt: skip


def test_drop_schedule() -> None:  # oracle 2
    assert drop_percent(0, 80, 20.0) == 20.0 and drop_percent(40, 80, 20.0) == 10.0 and drop_percent(80, 80, 20.0) == 0


def test_unreliable_set_is_never_empty() -> None:  # oracle 3
    entropy = torch.randperm(1000).float().view(1, 10, 100) / 1000 + 0.5  # 1000 distinct values
    pseudo = torch.zeros(1, 10, 100, dtype=torch.long)
    target = entropy_filter(pseudo, entropy, 20.0)
    assert int((target == 255).sum()) == 200
    assert (entropy[target == 255] > entropy[target != 255].max()).all()


def test_all_equal_entropies_drop_everything_and_the_loss_is_zero_not_nan() -> None:  # oracle 4
    pseudo = torch.randint(0, 3, (2, 4, 5))
    target = entropy_filter(pseudo, torch.full((2, 4, 5), 0.7), 20.0)
    assert (target == 255).all()
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    loss, kept = filtered_pseudo_loss(logits, target)
    assert loss.item() == 0.0 and kept.item() == 0.0
    loss.backward()  # the graph is kept
    assert logits.grad is not None and (logits.grad == 0).all()


def test_normalisation_scales_by_pixels_over_kept() -> None:  # oracle 5
    logits = torch.zeros(2, 4, 3, 5)  # uniform: CE = log 4 on every pixel
    target = torch.randint(0, 4, (2, 3, 5))
    target[0, 0] = 255  # 5 of 30 pixels dropped
    loss, kept = filtered_pseudo_loss(logits, target)
    assert math.isclose(loss.item(), math.log(4) * 30 / 25, rel_tol=1e-6) and math.isclose(
        kept.item(), 25 / 30, rel_tol=1e-6
    )


def _bank(c: int = 3, dim: int = 4) -> MemoryBank:
    return MemoryBank([5] * c, dim)


def test_confident_teacher_puts_nothing_in_the_bank() -> None:  # oracle 6
    torch.manual_seed(0)
    b, c, h, w = 1, 6, 8, 8
    prob = torch.randn(2 * b, c, h, w).softmax(1)
    pseudo = prob[b:].argmax(1)  # pseudo-label = the teacher's argmax: rank 0, never in [3, 20)
    label = torch.randint(0, c, (b, h, w))
    bank = MemoryBank([50] * c, 4)
    for per_image in (False, True):
        settings = ContrastSettings(alpha=20.0, per_image_onehot=per_image)
        contrastive_loss(torch.randn(2 * b, 4, h, w), torch.randn(2 * b, 4, h, w), prob, label, pseudo,
                         torch.rand(b, h, w), bank, settings, torch.Generator().manual_seed(0))  # fmt: skip
    assert len(bank) == 0  # labeled rows are always empty (faithful), unlabeled rows need rank >= 3


def test_negatives_arrive_when_the_label_is_a_low_ranked_class() -> None:
    b, c, h, w = 1, 6, 4, 4
    prob = torch.full((2 * b, c, h, w), 0.02)
    prob[:, 0] = 0.9  # class 5 ranks low everywhere
    pseudo = torch.full((b, h, w), 5)
    bank = MemoryBank([50] * c, 4)
    contrastive_loss(torch.randn(2 * b, 4, h, w), torch.randn(2 * b, 4, h, w), prob, torch.zeros(b, h, w).long(),
                     pseudo, torch.rand(b, h, w), bank, ContrastSettings(alpha=50.0),
                     torch.Generator().manual_seed(0))  # fmt: skip
    assert bank.count(5) == 8 and len(bank) == 8  # the top 50 % entropy half of 16 unlabeled pixels


def test_memory_bank_keeps_the_newest_rows_in_rank_then_arrival_order() -> None:  # oracle 7
    bank = MemoryBank([10, 10], 2)
    rows = [torch.full((3, 2), float(i)) for i in range(8)]
    for step in range(4):  # two "ranks" push 3 rows each, gathered in rank order
        bank.push(1, torch.cat([rows[2 * step], rows[2 * step + 1]]))
        assert bank.count(1) == min(6 * (step + 1), 10)
    expected = torch.cat(rows)[-10:]
    assert torch.equal(bank.queues[1], expected) and bank.count(0) == 0
    restored = MemoryBank([10, 10], 2)
    restored.load_state_tensors(bank.state_tensors())
    assert torch.equal(restored.queues[1], expected)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(bank.sample(1, 7, g1), restored.sample(1, 7, g2))
    with pytest.raises(ValueError, match="empty"):
        bank.sample(0, 1, g1)


def test_info_nce_value() -> None:  # oracle 8
    anchor = torch.zeros(4, 8)
    anchor[:, 0] = 1.0
    positive = torch.zeros(8)
    positive[0] = 2.0
    negatives = torch.zeros(4, 50, 8)
    negatives[..., 1] = 1.0  # orthogonal to the anchor
    assert math.isclose(
        info_nce(anchor, positive, negatives, 0.5).item(), math.log(1 + 50 * math.exp(-2)), rel_tol=1e-6
    )
    assert math.isclose(math.log(1 + 50 * math.exp(-2)), 2.04985, abs_tol=1e-5)


def test_class_indexing_bug_and_its_fix() -> None:  # oracle 9
    assert contrast_pairs([0, 2, 5], fix_class_indexing=False) == [(0, 0), (1, 2), (2, 5)]
    assert contrast_pairs([0, 2, 5], fix_class_indexing=True) == [(0, 0), (2, 2), (5, 5)]


def test_faithful_onehot_is_the_union_in_slot_zero() -> None:  # oracle 13
    labels = torch.randint(0, 4, (3, 5, 6))
    labels[0, 0, 0] = 255
    labels[1, 1, 1] = 255  # another image's 255 counts as class 0 in the union
    out = batch_onehot(labels, 4, per_image=False)
    per_image = batch_onehot(labels, 4, per_image=True)
    assert not out[1:].any()
    union = torch.nn.functional.one_hot(torch.where(labels == 255, 0, labels), 4).permute(0, 3, 1, 2).bool().any(0)
    union[:, 0, 0] = False
    assert torch.equal(out[0], union)
    assert per_image[1, :, 1, 1].sum() == 0 and per_image.sum() == (labels != 255).sum()


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(2)


def test_ema_schedule_with_supervised_only_epochs(tmp_path: Path) -> None:  # oracle 12
    cfg = demo_cfg(tmp_path, *U2PL, "u2pl.sup_only_epochs=1")
    method = U2plMethod(cfg)
    student = _Tiny()
    method.setup_teachers({"student": student}, torch.device("cpu"))
    teacher = method.teacher.module
    initial = {k: v.clone() for k, v in teacher.state_dict().items()}
    L = 4

    def after(step: int) -> None:
        with torch.no_grad():
            student.conv.weight.add_(0.1)
            student.bn.running_mean.add_(1.0)
        ctx = StepContext(step, step // L, L, 0, 1, torch.device("cpu"), torch.Generator(), lambda: None)  # type: ignore[arg-type]
        method.after_optimizer_step({"student": student}, ctx)

    for step in range(L - 1):  # epoch 0 < s: teacher untouched
        after(step)
        assert all(torch.equal(teacher.state_dict()[k], v) for k, v in initial.items())
    for step in range(L - 1, 2 * L):  # the last step of epoch 0 and all of epoch s = 1: teacher = student (params)
        after(step)
        assert torch.equal(teacher.conv.weight, student.conv.weight)
        assert torch.equal(teacher.bn.running_mean, initial["bn.running_mean"])  # buffers stay the teacher's
    before = teacher.conv.weight.clone()
    after(2 * L)  # epoch s + 1, step 0: d = 1 - 1/(L + 1)
    d = 1 - 1 / (L + 1)
    torch.testing.assert_close(teacher.conv.weight, d * before + (1 - d) * student.conv.weight)


def test_label_padding_is_class_zero_by_default(tmp_path: Path) -> None:  # oracle 11
    assert U2plMethod(demo_cfg(tmp_path, *U2PL)).label_pad == 0
    assert U2plMethod(demo_cfg(tmp_path, *U2PL, "u2pl.label_pad_value=255")).label_pad == 255


def test_u2pl_trains_exports_its_teacher_and_resumes_exactly(tmp_path: Path) -> None:
    from imas_train.teacher_artifact import load_teacher
    from imas_train.train import train

    settings = (*U2PL, "optim.epochs=2", "run.checkpoint_every=2", "run.tensorboard=false", "u2pl.cutmix_prob=1.0")
    straight = train(demo_cfg(tmp_path / "a", *settings))
    model, meta = load_teacher(straight.teacher_path)
    assert meta.training_summary["method"] == "u2pl" and meta.model_config["rep_head"] is True
    assert meta.training_summary["artifact_model"] == "ema_teacher" and model.rep is not None
    cfg_b = demo_cfg(tmp_path / "b", *settings)
    train(dataclasses.replace(cfg_b, optim=dataclasses.replace(cfg_b.optim, max_iters=2)))
    bank = load_file(str(tmp_path / "b" / "state" / "step-00000002" / "method_state.safetensors"))
    assert sum(v.shape[0] for k, v in bank.items() if k.startswith("bank.")) > 0  # negatives were banked
    resumed = train(cfg_b, resume="auto")
    assert resumed.iterations == straight.iterations == 4
    a, b = load_file(str(straight.teacher_path)), load_file(str(resumed.teacher_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    sa = load_file(str(tmp_path / "a" / "state" / "step-00000004" / "method_state.safetensors"))
    sb = load_file(str(tmp_path / "b" / "state" / "step-00000004" / "method_state.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the memory bank too


def test_the_shipped_u2pl_configs_load() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.glob("*u2pl*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        cfg = load_config(path)
        assert cfg.method == "u2pl" and cfg.u2pl is not None and cfg.model.decoder == "u2pl"
    assert np.isfinite(1.0)
