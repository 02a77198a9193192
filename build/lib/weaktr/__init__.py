"""weaktr: WeakTr weakly-supervised semantic segmentation on Ray."""

__version__ = "0.2.0"
