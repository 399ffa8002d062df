"""Exception hierarchy. Library code raises these; only the CLIs print them and choose exit codes."""

from __future__ import annotations


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
