"""Exception hierarchy and the exit codes of the three CLIs. Library code raises; only the CLIs print and exit.

Exit codes (the same for ``imas-train``, ``imas-export`` and ``imas-infer``; README "Exit codes"):

====  =====================================================================================================
0     done
1     an unexpected failure (a bug: Python prints the traceback); never returned on purpose
2     the command could not do its job: bad command line, config, data, file, artifact or a failed check
      (an `ImasError`, explained in one line)
3     finished, but some items failed: images that could not be segmented, problems found by ``check-data``
4     a runtime or device the command needs is missing here (TensorRT, cuda-python, a CUDA provider, a GPU)
130   interrupted (Ctrl-C)
138   training stopped on SIGUSR1 after writing a resumable checkpoint (128 + 10, the Linux signal number)
143   training stopped on SIGTERM after writing a resumable checkpoint (128 + 15): continue with ``--resume auto``
====  =====================================================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_PARTIAL = 3
EXIT_UNAVAILABLE = 4
EXIT_INTERRUPTED = 130
EXIT_STOPPED = {"SIGUSR1": 138, "SIGTERM": 143}  # a `TrainingStopped` run: 128 + the signal's number on Linux


class ImasError(Exception):
    """Base class for every error the toolkit raises on purpose (bad input, bad file, bad option)."""


class ConfigError(ImasError):
    """A config file or override is invalid: unknown key, wrong type, inconsistent values."""


class DataError(ImasError):
    """A dataset, split list, image or label file is missing or malformed."""


class WeightsError(ImasError):
    """A weight file does not fit the model it is loaded into."""


class ArtifactError(ImasError):
    """An artifact (teacher, ONNX, engine) or its sidecar JSON is missing, tampered with or mismatched."""


class ExportError(ImasError):
    """Export failed or its parity check did not pass."""


class InferError(ImasError):
    """Inference cannot run with the given model or options."""


class TrainingError(ImasError):
    """Training cannot continue (non-finite loss, unusable resume state)."""


class TrainingStopped(ImasError):
    """Training stopped on SIGTERM or SIGUSR1 after writing a resumable checkpoint (not a failure: resume it)."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name  # "SIGTERM" or "SIGUSR1": a key of EXIT_STOPPED


class RuntimeUnavailable(ImasError):
    """An optional runtime (TensorRT, cuda-python, a CUDA provider) or the GPU it needs is missing on this machine."""


def exit_code(err: ImasError) -> int:
    """The exit code of a CLI that stops on `err`: 4 for a missing runtime, 143/138 for a stopped run, else 2."""
    if isinstance(err, TrainingStopped):
        return EXIT_STOPPED[err.signal_name]
    return EXIT_UNAVAILABLE if isinstance(err, RuntimeUnavailable) else EXIT_ERROR
