"""Compare dictionaries with the report's measures and draw its figures."""

from unsuperpose.analyze.grid import grid_figures, ground_truth_callback, score_grid
from unsuperpose.analyze.metrics import cosine_matrix, mcc, mmcs, mmcs_with_larger, ssll

__all__ = ["grid_figures", "ground_truth_callback", "score_grid", "cosine_matrix", "mcc", "mmcs",
           "mmcs_with_larger", "ssll"]
