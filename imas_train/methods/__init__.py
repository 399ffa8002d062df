"""Training methods, one module each, chosen by the config's ``method:`` key (docs/design.md, "Methods").

Adding a method: write ``imas_train/methods/<name>.py`` with a `Method` subclass (and its config section in
`imas_train.config` when it has settings), then add it to `METHODS` below and to ``TrainConfig.method``'s choices.
The training loop (`imas_train.train`) needs no edit.
"""

from __future__ import annotations

from imas_core.errors import ConfigError
from imas_train.config import TrainConfig
from imas_train.methods.base import Method, StepContext, StepResult, StudentForward, step_generator
from imas_train.methods.cct import CctMethod
from imas_train.methods.cps import CpsMethod
from imas_train.methods.dual_teacher import DualTeacherMethod
from imas_train.methods.imas import ImasMethod
from imas_train.methods.st_pp import StPpMethod
from imas_train.methods.supervised import SupervisedMethod
from imas_train.methods.u2pl import U2plMethod

__all__ = ["METHODS", "Method", "StepContext", "StepResult", "StudentForward", "build_method", "step_generator"]

METHODS: dict[str, type[Method]] = {
    "supervised": SupervisedMethod,
    "imas": ImasMethod,
    "u2pl": U2plMethod,
    "cps": CpsMethod,
    "cct": CctMethod,
    "dual_teacher": DualTeacherMethod,
    "st_pp": StPpMethod,  # one stage training; the pipeline is imas_train.st_pp
}


def build_method(cfg: TrainConfig) -> Method:
    """The `Method` named by ``cfg.method``."""
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)
