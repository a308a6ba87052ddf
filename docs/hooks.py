"""mkdocs hook: tables that come from `make bench` are rendered from the bench records committed
under docs/results/data/, so a figure has one source.

A page asks for a table with a marker on a line of its own, e.g.

    <!-- bench-table: calibration -->

and the hook replaces it with the table the benchmark's own renderer prints from the records
(for the calibration: ``benchmarks.bench_calibration.markdown``, the same function
``python -m benchmarks.bench_calibration`` calls; for a run of the peers benchmark,
``bench_peers-<commit>``: ``benchmarks.bench_peers.table``, the table ``python -m benchmarks
bench_peers`` prints at its end). An unknown marker or missing records fail the build.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "results" / "data"
MARKER = re.compile(r"^<!-- bench-table: ([\w-]+) -->$", re.MULTILINE)


def _records(name: str) -> list[dict]:
    path = DATA / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _importable() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _calibration() -> str:
    _importable()
    from benchmarks.bench_calibration import markdown

    return markdown(_records("calibration"), _records("calibration-rule3"))


def _calibration_decision() -> str:
    """The pre-registered rule for defaults applied to the committed records: declared and
    resulting default per architecture (``benchmarks.bench_calibration.decide_defaults``)."""
    _importable()
    from benchmarks.bench_calibration import decide_defaults, decision_markdown
    from unsuperpose.analyze.diagnostics import DECLARED_READING

    return decision_markdown(decide_defaults(_records("calibration"), DECLARED_READING))


def _bench_peers(name: str):
    """The summary table of one bench_peers run, from its records ``<name>.jsonl``."""

    def render() -> str:
        _importable()
        from benchmarks.bench_peers import table

        return table(_records(name))

    return render


TABLES = {
    "calibration": _calibration,
    "calibration-decision": _calibration_decision,
    # the runs on a quiet machine (both shapes, all five architectures, ReLU fresh and trained)
    "bench_peers-c15ee0e": _bench_peers("bench_peers-c15ee0e"),
    "bench_peers-fdd61d9": _bench_peers("bench_peers-fdd61d9"),
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def render(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(f"{page.file.src_path}: no bench table named {name!r}")
        return TABLES[name]()

    return MARKER.sub(render, markdown)
