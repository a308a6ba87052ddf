"""Compare dictionaries with the report's measures and draw its figures; the LM report and the
feature browser."""

from unsuperpose.analyze.collect import (
    Grid,
    GridError,
    collect_lm,
    collect_toy,
    merge_sets,
    read_set,
)
from unsuperpose.analyze.diagnostics import Diagnosis, dead_boundary, diagnose, largest_alive, peak
from unsuperpose.analyze.grid import grid_figures, ground_truth_callback, score_grid
from unsuperpose.analyze.metrics import cosine_matrix, mcc, mmcs, mmcs_with_larger, ssll

__all__ = [
    "grid_figures",
    "ground_truth_callback",
    "score_grid",
    "cosine_matrix",
    "mcc",
    "mmcs",
    "mmcs_with_larger",
    "ssll",
    "Grid",
    "GridError",
    "collect_lm",
    "collect_toy",
    "merge_sets",
    "read_set",
    "Diagnosis",
    "dead_boundary",
    "diagnose",
    "largest_alive",
    "peak",
    "build_report",
    "build_browser",
    "BrowserError",
]


def __getattr__(name):
    # The report and the browser pull in matplotlib, the store reader and the tokenizer glue:
    # loaded on first use, so `from unsuperpose.analyze import mmcs` stays light for `train`.
    if name == "build_report":
        from unsuperpose.analyze.report import build_report

        return build_report
    if name == "build_browser":
        from unsuperpose.analyze.features import build_browser

        return build_browser
    if name == "BrowserError":
        from unsuperpose.analyze.browser import BrowserError

        return BrowserError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
