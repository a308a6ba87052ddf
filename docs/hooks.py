"""mkdocs hook: tables that come from `make bench` are rendered from the bench records committed
under docs/results/data/, so a figure has one source.

A page asks for a table with a marker on a line of its own, e.g.

    <!-- bench-table: calibration -->

and the hook replaces it with the table the benchmark's own renderer prints from the records
(for the calibration: ``benchmarks.bench_calibration.markdown``, the same function
``python -m benchmarks.bench_calibration`` calls). An unknown marker or missing records fail the
build.
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


def _calibration() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.bench_calibration import markdown

    return markdown(_records("calibration"), _records("calibration-rule3"))


TABLES = {"calibration": _calibration}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def render(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(f"{page.file.src_path}: no bench table named {name!r}")
        return TABLES[name]()

    return MARKER.sub(render, markdown)
