"""Progress of an export: one record per stage (what was produced, how big, how long), printed by the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    """One finished stage, e.g. ``export  model.onnx  41.2 MB  3.1 s``."""

    name: str
    seconds: float
    path: Path | None = None
    size: int | None = None  # bytes of `path` when the stage finished (temporary files vanish later)
    note: str = ""

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        parts = [f"{self.name:<8}"]
        if self.path is not None:
            parts.append(f"{self.path.name}  {format_size(self.size)}")
        if self.note:
            parts.append(self.note)
        parts.append(f"{self.seconds:.1f} s")
        return "  ".join(parts)


StageCallback = Callable[[Stage], None]


def format_size(size: int | None) -> str:
    """A size in MB with one decimal (KB below 0.1 MB), or '-' when unknown."""
    if size is None:
        return "-"
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} KB"


@dataclass
class StageLog:
    """Collects stages and forwards each to an optional callback as soon as it finishes."""

    callback: StageCallback | None = None
    stages: list[Stage] = field(default_factory=list)
    _start: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        """Start timing the next stage now."""
        self._start = time.perf_counter()

    def done(self, name: str, path: Path | None = None, note: str = "") -> Stage:
        """Record the stage that started at the last `done`/`restart` and restart the clock."""
        now = time.perf_counter()
        size = path.stat().st_size if path is not None and path.is_file() else None
        stage = Stage(name=name, seconds=now - self._start, path=path, size=size, note=note)
        self._start = now
        self.stages.append(stage)
        if self.callback is not None:
            self.callback(stage)
        return stage
