"""The docs: the site builds with --strict (no broken link, no missing page, every bench table
rendered from its records), the README stays short, and no page names a file of the repository
that is not in it."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200
# the bench_peers runs whose records (docs/results/data/<run>.jsonl) the speed page renders
PEERS_RUNS = ("bench_peers-fdd61d9", "bench_peers-c15ee0e")
# where a path names a file of this repository: the stage folders, the package, the benchmarks,
# the tests and the docs themselves (commands/ too, where the command modules live)
TOP = "lm|harvest|toy|train|analyze|commands|unsuperpose|benchmarks|tests|docs"
PATH = re.compile(r"(?<![\w./~-])((?:" + TOP + r")/[\w./*-]*[\w*/])")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def named_paths(text: str) -> set[str]:
    found = set()
    for match in PATH.finditer(text):
        path = match.group(1)
        end = text[match.end() : match.end() + 1]
        if end in "<{":  # a pattern such as train/families/<arch>.py or blocks.{layer}
            continue
        if "." not in path.rsplit("/", 1)[-1] and not path.endswith("/"):
            # a bare word after a slash ("train/analyze", "lm/harvest") is prose, not a path;
            # folders are named with their trailing slash
            if not (ROOT / path).is_dir():
                continue
        found.add(path.rstrip(".") if not path.endswith("/") else path)
    return found


def test_mkdocs_build_strict(tmp_path):
    from benchmarks.bench_peers import table  # imports torch: only where the build is checked

    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "index.html").is_file()
    # the calibration table is rendered from the committed records, not written by hand
    page = (out / "results" / "calibration" / "index.html").read_text()
    assert "bench-table" not in page
    assert page.count("<tr>") >= 10
    # and the decision on defaults under it, with jumprelu's change
    flat = re.sub(r">\s+<", "><", page)
    assert "<td>jumprelu</td><td>6</td><td>live latents: 2, 2</td><td>measured latents</td>" in flat
    # so are the bench_peers summaries on the speed page: the page asks for them by marker, and
    # every row the bench's own table() prints from the committed records is in its HTML
    source = (ROOT / "docs" / "results" / "speed.md").read_text()
    speed = re.sub(r">\s+<", "><", (out / "results" / "speed" / "index.html").read_text())
    assert "bench-table" not in speed
    for run in PEERS_RUNS:
        assert f"<!-- bench-table: {run} -->" in source.splitlines()
        lines = (ROOT / "docs" / "results" / "data" / f"{run}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        rows = table(records).splitlines()[2:]
        assert len(rows) == sum(r.get("figure") == "peers_summary" for r in records) >= 3
        for row in rows:
            cells = (html.escape(c.strip(), quote=False) for c in row.strip("|").split("|"))
            assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in speed, row


def test_readme_python_example_runs(tmp_path):
    """The README's Python example, as printed, at a few steps instead of its 2,000."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert len(code.strip().splitlines()) <= 12
    assert "steps=2000" in code
    proc = subprocess.run(
        [sys.executable, "-c", code.replace("steps=2000", "steps=30")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    fvu, recovered = (float(v) for v in proc.stdout.split())
    assert fvu > 0 and 0 < recovered <= 1


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_exist(doc):
    missing = []
    for path in sorted(named_paths(doc.read_text())):
        hits = list(ROOT.glob(path.rstrip("/"))) if "*" in path else [ROOT / path]
        if not any(h.exists() for h in hits):
            missing.append(path)
    assert not missing, f"{doc.relative_to(ROOT)} names files the repository lacks: {missing}"


def test_path_finder():
    text = (
        "see `train/families/topk_fast.py`, `tests/test_families_*.py`, `train/families/`,"
        " train/families/<arch>.py, `runs/acts/tiny`, docs/images/nope.png and"
        " transformer_lens/model_bridge/x.py; train/analyze both"
    )
    assert named_paths(text) == {
        "train/families/topk_fast.py",
        "tests/test_families_*.py",
        "train/families/",
        "docs/images/nope.png",
    }
