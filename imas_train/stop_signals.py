"""SIGTERM / SIGUSR1 handling of a training run: finish the iteration, checkpoint, exit with 128 + the signal.

What Slurm preemption, ``docker stop`` and Kubernetes send. The handler only records the signal; the loop asks every
process after each iteration (`StopSignals.agreed`), so all of them checkpoint at the same iteration.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
from accelerate import Accelerator

__all__ = ["StopSignals"]


class StopSignals:
    """SIGTERM and SIGUSR1 ask the training loop to stop; the handler only records which signal came.

    A context manager: installs the handlers on entry (main thread only: Python delivers signals there) and
    restores the previous ones on exit. DataLoader workers forked meanwhile inherit the handler and ignore the
    signal, so a signal sent to the whole process group (Slurm) stops only the loop, cleanly.
    """

    NAMES = ("SIGUSR1", "SIGTERM")  # by priority: when processes disagree, SIGTERM decides the exit code

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = signal.Signals[name]
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, accelerator: Accelerator) -> str | None:
        """The signal every process stops on, or None: a collective (a gather) when there are several processes."""
        code = self.NAMES.index(self.received) + 1 if self.received is not None else 0
        if accelerator.num_processes > 1:
            code = int(accelerator.gather(torch.tensor([code], device=accelerator.device)).max().item())
        return self.NAMES[code - 1] if code else None
