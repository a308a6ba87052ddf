"""Synthetic activations with known ground-truth features (the report's toy data)."""

from unsuperpose.toy.config import ToyConfig
from unsuperpose.toy.source import ToySource

__all__ = ["ToyConfig", "ToySource"]
