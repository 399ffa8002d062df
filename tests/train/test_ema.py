"""EMA teacher and its decay schedule (docs/algorithm.md §3 step 10)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from imas_train.ema import EmaTeacher, ema_decay


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _trained_student(seed: int) -> nn.Module:
    student = _net(seed).train()
    student(torch.randn(2, 3, 6, 6))  # moves the BN running stats and num_batches_tracked
    student(torch.randn(2, 3, 6, 6))
    return student


class _Wrapper(nn.Module):  # keys get a "module." prefix, like DDP
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_decay_schedule() -> None:
    L = 10
    assert all(ema_decay(i, L, 0, 0.996) == 0.0 for i in range(L))  # teacher = student throughout epoch 0
    assert ema_decay(L, L, 0, 0.996) == pytest.approx(1 - 1 / (L + 1))
    assert ema_decay(L + 5, L, 0, 0.996) == pytest.approx(1 - 1 / (L + 6))
    assert ema_decay(10_000, L, 0, 0.996) == 0.996
    L = 100  # reaches alpha at global iteration 249
    assert ema_decay(248, L, 0, 0.996) < 0.996
    assert ema_decay(249, L, 0, 0.996) == 0.996
    L = 578  # VOC 1323: 1 - 1/(L + 1) > alpha, so d jumps from 0 straight to alpha at epoch 1 step 0
    assert ema_decay(L - 1, L, 0, 0.996) == 0.0
    assert ema_decay(L, L, 0, 0.996) == 0.996
    assert all(ema_decay(i, 10, 2, 0.996) == 0.0 for i in range(30))  # sup_only_epochs = 2
    assert ema_decay(30, 10, 2, 0.996) == pytest.approx(1 - 1 / 11)


def test_teacher_is_eval_without_grad() -> None:
    ema = EmaTeacher(_net(0).train())
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_decay_zero_copies_student_exactly() -> None:
    ema = EmaTeacher(_net(0))
    student = _trained_student(1)
    ema.update(student, 0.0)
    for (key, t), s in zip(ema.module.state_dict().items(), student.state_dict().values(), strict=True):
        assert torch.equal(t, s), key
    assert int(ema.module.state_dict()["1.num_batches_tracked"]) == 2


def test_decay_one_freezes_floats_and_copies_integer_buffers() -> None:
    ema = EmaTeacher(_net(0))
    before = copy.deepcopy(ema.module.state_dict())
    student = _trained_student(1)
    ema.update(student, 1.0)
    for key, t in ema.module.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(t, before[key]), key
        else:
            assert torch.equal(t, student.state_dict()[key]), key


def test_lerp_of_params_and_bn_buffers() -> None:
    ema = EmaTeacher(_net(0))
    before = copy.deepcopy(ema.module.state_dict())
    student = _trained_student(1)
    ema.update(student, 0.9)
    after = ema.module.state_dict()
    for key in ("0.weight", "1.running_mean", "1.running_var", "3.bias"):
        torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * student.state_dict()[key])


def test_prefixed_syncbn_student_pairs_by_key() -> None:
    ema = EmaTeacher(_net(0))
    student = nn.SyncBatchNorm.convert_sync_batchnorm(_trained_student(1))
    assert isinstance(student[1], nn.SyncBatchNorm)
    ema.update(_Wrapper(student), 0.0)
    assert isinstance(ema.module[1], nn.BatchNorm2d)
    torch.testing.assert_close(ema.module.state_dict()["1.running_var"], student.state_dict()["1.running_var"])


def test_mismatched_keys_raise() -> None:
    ema = EmaTeacher(_net(0))
    with pytest.raises(ValueError, match="differ"):
        ema.update(nn.Sequential(nn.Conv2d(3, 4, 3)), 0.5)
    with pytest.raises(ValueError, match="decay"):
        ema.update(_net(1), 1.5)


def test_state_dict_round_trip() -> None:
    ema = EmaTeacher(_net(0))
    ema.update(_trained_student(1), 0.0)
    state = copy.deepcopy(ema.state_dict())
    other = EmaTeacher(_net(2))
    other.load_state_dict({f"module.{k}": v for k, v in state.items()})
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key])
    assert not other.module.training


def test_buffers_can_stay_the_teachers_own_and_restart_copies_everything() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    teacher = EmaTeacher(copy.deepcopy(student), ema_buffers=False)
    student.train()(torch.randn(2, 3, 8, 8))  # moves the student's running statistics
    with torch.no_grad():
        student[0].weight.add_(1.0)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    teacher.update(student, 0.5)
    after = teacher.module.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(after[key], before[key])  # buffers untouched
    torch.testing.assert_close(after["0.weight"], 0.5 * before["0.weight"] + 0.5 * student[0].weight)
    teacher.restart(student)
    for key, value in student.state_dict().items():
        assert torch.equal(teacher.module.state_dict()[key], value)
