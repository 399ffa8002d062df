"""Shared core of the imas toolkit: what training, export and inference all need, on numpy alone.

Holds the errors, artifact sidecars and their typed validation, atomic file writes, window tiling, class tables,
numpy scores, constants, the typed loader, runtime probes and the backend runners (`imas_core.runners`). Importing
this package never imports torch, accelerate or PyYAML; the runners import their runtime when one is opened.
"""

__version__ = "0.1.0"
