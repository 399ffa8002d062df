"""The contact sheet of ``imas-train label-next``: one row per picked image, so a person sees why it was picked.

Each row: the facts (rank, name, easiness now / mean / trend, teacher-student disagreement, the teacher's confident
share and predicted class mix), the image, the teacher's labels, the student's labels (class colours) and the
disagreement map (the image dimmed to grey, pixels where the two models' labels differ in red). A class legend ends
the sheet. Drawn on matplotlib's Agg canvas with a fixed layout (no pyplot, no tight bounding box), so the PNG's size
is a function of the row count and the images' aspect only: `sheet_size`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = ["DPI", "render_contact_sheet", "sheet_size", "colourise", "disagreement_map"]

DPI = 100
_TEXT_W, _PANEL_W = 3.3, 2.0  # inches: the facts column and each of the four image panels
_HEADER_H, _GAP = 0.6, 0.12
_LEGEND_COLUMNS = 8
_PANELS = ("image", "teacher", "student", "disagreement (red)")
_DISAGREE_RGB = np.array([255, 40, 40], dtype=np.uint8)


def _row_height(aspect: float) -> float:
    """Inches per row for images of height/width `aspect` (clamped so extreme shapes stay legible)."""
    return _PANEL_W * min(max(aspect, 0.4), 1.3) + _GAP


def _footer_height(num_classes: int) -> float:
    """Inches for the legend: the classes plus the disagreement colour, `_LEGEND_COLUMNS` entries a line."""
    return 0.2 + 0.22 * math.ceil((num_classes + 1) / _LEGEND_COLUMNS)


def sheet_size(num_rows: int, aspect: float, num_classes: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet of `num_rows` rows of images of height/width `aspect`."""
    width = _TEXT_W + 4 * _PANEL_W
    height = _HEADER_H + num_rows * _row_height(aspect) + _footer_height(num_classes)
    return round(width * DPI), round(height * DPI)


def colourise(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 class colours (indices beyond the palette are white)."""
    table = np.full((256, 3), 255, dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[labels.astype(np.uint8)]


def disagreement_map(rgb: np.ndarray, labels_t: np.ndarray, labels_s: np.ndarray) -> np.ndarray:
    """The image as dim grey, with the pixels where the teacher's and the student's labels differ in red."""
    grey = (0.35 * rgb.astype(np.float32).mean(2, keepdims=True) + 40).astype(np.uint8)
    out = np.repeat(grey, 3, axis=2)
    out[labels_t != labels_s] = _DISAGREE_RGB
    return out


def _short(name: str, limit: int = 30) -> str:
    return name if len(name) <= limit else name[: limit // 2 - 1] + "…" + name[-(limit // 2) :]


def _pct(value: object) -> str:
    return "n/a" if not isinstance(value, float) or not math.isfinite(value) else f"{100 * value:.0f}%"


def _num(value: object, fmt: str) -> str:
    return "n/a" if not isinstance(value, float) or not math.isfinite(value) else format(value, fmt)


def _facts(row: Mapping[str, object], class_names: Sequence[str]) -> str:
    mix = sorted(zip(row["class_mix"], class_names, strict=True), reverse=True)[:3]  # type: ignore[call-overload]
    mix_text = ", ".join(f"{_short(name, 12)} {100 * share:.0f}%" for share, name in mix if share > 0)
    return "\n".join([
        f"#{row['rank']}  {_short(str(row['name']))}",
        f"easiness now {_num(row['easiness_now'], '.2f')}, mean {_num(row['easiness_mean'], '.2f')}",
        f"trend {_num(row['trend'], '+.3f')} / epoch ({row['epochs_seen']} epochs)",
        f"disagree {_pct(row['disagreement'])}, teacher sure {_pct(row['teacher_confident'])}",
        f"teacher says: {mix_text}",
    ])  # fmt: skip


def render_contact_sheet(
    rows: Sequence[Mapping[str, object]],
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    *,
    rule: str,
    window: int,
) -> bytes:
    """The sheet as PNG bytes.

    Args:
        rows: in rank order, each with the report's columns (`label_next.report_csv`) plus ``rgb`` (H, W, 3) uint8,
            ``labels_t`` and ``labels_s`` (H, W) class indices.
        class_names, palette: for the class colours and the legend.
        rule, window: named in the header.
    """
    aspect = max((r["rgb"].shape[0] / r["rgb"].shape[1] for r in rows), default=0.75)  # type: ignore[attr-defined]
    width_px, height_px = sheet_size(len(rows), aspect, len(class_names))
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    fw, fh = width_px / DPI, height_px / DPI
    row_h = _row_height(aspect)
    scope = {"models": "", "last": f" (the latest epoch; mean and trend over the last {window})"}
    header = f"what to label next: rule '{rule}'" + scope.get(rule, f" over the last {window} epochs")
    fig.text(0.01, 1 - 0.2 / fh, header, va="center", ha="left", fontsize=10, weight="bold")
    for k, title in enumerate(_PANELS):
        x = (_TEXT_W + (k + 0.5) * _PANEL_W) / fw
        fig.text(x, 1 - 0.48 / fh, title, va="center", ha="center", fontsize=9)
    for r, row in enumerate(rows):
        top = _HEADER_H + r * row_h
        bottom = 1 - (top + row_h - _GAP / 2) / fh
        height = (row_h - _GAP) / fh
        fig.text(0.01, bottom + height / 2, _facts(row, class_names), va="center", ha="left", fontsize=7.5,
                 family="monospace", linespacing=1.35)  # fmt: skip
        rgb, lt, ls = row["rgb"], row["labels_t"], row["labels_s"]
        panels = (rgb, colourise(lt, palette), colourise(ls, palette), disagreement_map(rgb, lt, ls))  # type: ignore[arg-type]
        for k, picture in enumerate(panels):
            ax = fig.add_axes(((_TEXT_W + k * _PANEL_W + 0.04) / fw, bottom, (_PANEL_W - 0.08) / fw, height))
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
    handles = [
        Patch(facecolor=np.asarray(colour) / 255.0, edgecolor="0.5", label=name)
        for name, colour in zip(class_names, palette, strict=False)
    ]
    handles.append(Patch(facecolor=_DISAGREE_RGB / 255.0, label="teacher ≠ student"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), _LEGEND_COLUMNS), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.05 / fh))  # fmt: skip
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
