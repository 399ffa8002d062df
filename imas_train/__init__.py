"""Training package: DeepLabV3+ models, data, methods (`imas_train.methods`) and the training loop."""

from imas_core import __version__

__all__ = ["__version__"]
