"""The parity line says on how many and which images the export was compared (and its mIoU computed)."""

from __future__ import annotations

from imas_export.parity import ParityReport


def _report(source: str) -> ParityReport:
    return ParityReport(
        backend="onnxruntime-cpu", precision="fp32", images=8, source=source, compared="logits", agreement=1.0,
        max_abs=1e-5, mean_abs=1e-6, min_agreement=0.999, max_abs_limit=1e-2,
        miou_reference=0.6852, miou=0.6852, miou_delta=0.0,
    )  # fmt: skip


def test_demo_parity_says_its_images_are_not_the_training_validation() -> None:
    line = _report("demo:val").line()
    assert (
        "on 8 images (the first 8 demo val scenes" in line and "not the images or the count training evaluated" in line
    )
    assert "mIoU 68.52 on these 8 images (torch 68.52, +0.00)" in line


def test_folder_parity_names_the_folder() -> None:
    assert "agreement 100.000% on 8 images (data/val)," in _report("data/val").line()
