"""weaktr: WeakTr weakly-supervised semantic segmentation on Ray."""

__version__ = "0.1.0"
