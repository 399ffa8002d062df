"""PNG plots written into the run folder after each evaluation: easiness trajectory and mIoU per eval epoch.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch) and written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from imas_core.atomic import atomic_write_bytes

__all__ = ["plot_easiness", "plot_miou"]

History = Mapping[str, Sequence[float | None]]


def _write(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _finite(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def plot_easiness(history: History, path: Path) -> None:
    """Per-epoch mean easiness with its p10-p90 band (like the paper's Figure 2c), plus the student confident
    ratio and the CutMix fire rate.

    Args:
        history: ``Progress.history`` (keys epoch, easiness_mean, easiness_p10, easiness_p90, ratio_s_mean,
            cutmix_rate).
        path: the PNG to write (``<run>/easiness.png``).
    """
    epochs = list(history["epoch"])
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    if epochs:
        ax.fill_between(
            epochs, _finite(history["easiness_p10"]), _finite(history["easiness_p90"]),
            alpha=0.25, color="tab:blue", label="easiness p10-p90",
        )  # fmt: skip
        ax.plot(epochs, _finite(history["easiness_mean"]), "o-", color="tab:blue", label="easiness mean")
        ax.plot(epochs, _finite(history["ratio_s_mean"]), "s--", color="tab:green", label="student confident ratio")
        ax.plot(epochs, _finite(history["cutmix_rate"]), "^:", color="tab:orange", label="CutMix fire rate")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small", frameon=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel("per-epoch value")
    ax.set_ylim(0.0, 1.0)
    ax.set_title("Instance easiness e (large = easy)")
    ax.grid(alpha=0.3)
    _write(fig, path)


def plot_miou(history: History, path: Path) -> None:
    """Teacher (and, when evaluated, student) mIoU in percent per evaluation epoch.

    Args:
        history: ``Progress.history`` (keys eval_epoch, miou_teacher, miou_student; None = not evaluated).
        path: the PNG to write (``<run>/miou.png``).
    """
    epochs = list(history["eval_epoch"])
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for key, label, style in (("miou_teacher", "teacher", "o-"), ("miou_student", "student", "s--")):
        values = [100.0 * v for v in _finite(history[key])]
        if any(not math.isnan(v) for v in values):
            ax.plot(epochs, values, style, label=label)
    if epochs:
        ax.legend(loc="lower right", fontsize="small")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("Validation mIoU")
    ax.grid(alpha=0.3)
    _write(fig, path)
