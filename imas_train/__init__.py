"""iMAS semi-supervised semantic segmentation: training package (the root of the import tiers)."""

__version__ = "0.1.0"
