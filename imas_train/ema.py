"""The EMA teacher and its decay schedule (docs/algorithm.md §3 step 10, §10 item 8)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ema_decay", "EmaTeacher"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def ema_decay(step: int, iters_per_epoch: int, sup_only_epochs: int, alpha: float) -> float:
    """Decay d of the teacher update after global iteration `step` (0-based, = epoch * L + step in epoch).

    d = 0 while epoch = step // L <= sup_only_epochs (so with the default 0 the teacher is an exact copy of the
    student throughout epoch 0), else d = min(1 - 1 / (step - L * sup_only_epochs + 1), alpha). At epoch 1 step 0
    this is min(1 - 1/(L + 1), alpha). With sup_only_epochs = 0 it reaches alpha = 0.996 at global iteration
    max(249, L): 249 when L <= 249 (Cityscapes, L = 93..174), at once at epoch 1 step 0 otherwise (VOC 1323, L = 578).

    Args:
        step: global iteration i.
        iters_per_epoch: L.
        sup_only_epochs: the reference's ``sup_only_epoch``.
        alpha: the EMA momentum cap (0.996).
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    if step // iters_per_epoch <= sup_only_epochs:
        return 0.0
    return min(1.0 - 1.0 / (step - iters_per_epoch * sup_only_epochs + 1), alpha)


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop wrapper prefixes (``module.``, ``_orig_mod.``, possibly nested) from state-dict keys."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def _check_keys(teacher_state: Mapping[str, Tensor], student_state: Mapping[str, Tensor]) -> None:
    missing = sorted(set(teacher_state) - set(student_state))
    unexpected = sorted(set(student_state) - set(teacher_state))
    if missing or unexpected:
        raise ValueError(
            f"EMA: student and teacher state dicts differ; missing in the student: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; not in the teacher: {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )


class EmaTeacher:
    """Holds the teacher, a plain module (never `prepare`d), in eval mode with gradients off.

    `update` pairs tensors by state-dict key, so a SyncBatchNorm or DDP/compiled student updates a BatchNorm teacher.
    Floating parameters are lerped. Buffers depend on `ema_buffers`: True (iMAS) lerps floating buffers (BN running
    mean/var) and copies integer ones (``num_batches_tracked``); False (U2PL, whose teacher's BN statistics come
    from its own train-mode forwards) leaves every buffer to the teacher. `restart` copies the student exactly (the
    per-epoch restarts of Dual Teacher). `state_dict` / `load_state_dict` save and restore the teacher.

    Attributes:
        module: the teacher network.
        ema_buffers: whether buffers follow the student (see above).
    """

    def __init__(self, module: nn.Module, *, ema_buffers: bool = True) -> None:
        self.module = module
        self.ema_buffers = ema_buffers
        self._buffer_keys = {name for name, _ in module.named_buffers()}
        module.eval()
        module.requires_grad_(False)

    def restart(self, student: nn.Module) -> None:
        """Make the teacher an exact copy of the student (parameters and buffers), whatever `ema_buffers` says."""
        with torch.no_grad():
            teacher_state = self.module.state_dict()
            student_state = _strip_prefixes(student.state_dict())
            _check_keys(teacher_state, student_state)
            for key, t in teacher_state.items():
                t.copy_(student_state[key].detach().to(device=t.device, dtype=t.dtype))

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        """theta_t <- d * theta_t + (1 - d) * theta_s for every floating tensor; integer tensors are copied.

        Args:
            student: the student, possibly wrapped (``module.`` / ``_orig_mod.`` prefixes are ignored).
            decay: d in [0, 1]; 0 copies the student exactly, 1 leaves the teacher unchanged.

        Raises:
            ValueError: if the student's and teacher's state-dict keys or shapes differ, or `decay` is out of range.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        teacher_state = self.module.state_dict()  # detached tensors sharing storage with the teacher's own
        student_state = _strip_prefixes(student.state_dict())
        _check_keys(teacher_state, student_state)
        lerp_t: list[Tensor] = []
        lerp_s: list[Tensor] = []
        for key, t in teacher_state.items():
            if not self.ema_buffers and key in self._buffer_keys:
                continue  # the teacher's own statistics
            s = student_state[key].detach()
            if t.shape != s.shape:
                raise ValueError(
                    f"EMA: {key} has shape {tuple(s.shape)} in the student, {tuple(t.shape)} in the teacher"
                )
            s = s.to(device=t.device, dtype=t.dtype)
            if t.is_floating_point() and decay > 0.0:
                lerp_t.append(t)
                lerp_s.append(s)
            else:  # integer buffers, and an exact copy when d = 0
                t.copy_(s)
        if lerp_t and decay < 1.0:
            torch._foreach_lerp_(lerp_t, lerp_s, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        """The teacher's state dict (for Accelerate checkpointing)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a teacher state dict strictly (``module.`` prefixes are ignored); the teacher stays in eval mode."""
        self.module.load_state_dict(_strip_prefixes(state_dict), strict=True)
        self.module.eval()
