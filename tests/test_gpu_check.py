"""benchmarks/gpu_check.sh end to end on the CPU at its test size, and its table's verdicts.

The script runs at ``GPU_CHECK_SIZE=tiny``: the same four sub-checks as on a GPU, shrunk so
they take seconds, with one substitution the table states in its row: the harvest row runs a
random tiny GPT-2, not SmolLM2, whose adoption alone takes ~40 s here (``GPU_CHECK_SIZE=reduced``
harvests SmolLM2). Without a GPU the CPU = GPU row must read "n/a: no GPU ..." and the same
comparison must have run CPU against CPU in a second process, bit for bit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import ROWS, table

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^[0-9][0-9,]*(\.[0-9]+)?(e[-+][0-9]+)?( |$)")


def _rows(text: str) -> dict[str, tuple[str, str]]:
    """label -> (figure, setting) of each table row."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "check":
            out[cells[0]] = (cells[1], cells[3])
    return out


@pytest.mark.slow
def test_the_check_runs_on_the_cpu_and_every_row_has_a_figure_or_a_reason(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run benchmarks/gpu_check.sh at its full size")
    env = {
        **os.environ,
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_SIZE": "tiny",
        "GPU_CHECK_OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = {p.name: p.read_text()[-1500:] for p in tmp_path.glob("*.log")}
    assert done.returncode == 0, (done.stdout, done.stderr, logs)
    assert "no GPU figure" in done.stdout.splitlines()[0]
    rows = _rows(done.stdout)
    assert list(rows) == [label for _, label, _ in ROWS]
    for label, (figure, setting) in rows.items():
        assert NUMBER.match(figure) or re.match(r"^n/a: \S", figure), (label, figure)
        assert setting, label
    assert rows["same seed: CPU = GPU"][0].startswith("n/a: no GPU")
    assert rows["same seed: CPU = CPU, 2nd process"][0] == "0 max abs diff"
    assert "not SmolLM2" in rows["harvest tokens/s"][1]
    assert float(rows["paper grid wall time"][0].split()[0]) > 0


def test_a_check_that_timed_out_crashed_or_wrote_nothing_fails_the_table(tmp_path):
    # The sub-checks' outputs as the script leaves them: speed timed out, harvest crashed,
    # same-seed exited 0 without rows, paper wrote its row.
    (tmp_path / "paper.jsonl").write_text(
        '{"row": "paper", "setting": "s", "load_1m": 1.0, "value": 12.5, "unit": "s"}\n'
    )
    for check, rc in (("paper", 0), ("speed", 124), ("harvest", 1), ("same-seed", 0)):
        (tmp_path / f"{check}.rc").write_text(f"{rc}\n")
    (tmp_path / "harvest.log").write_text("Traceback ...\nValueError: no such layer\n")
    text, ok = table(tmp_path, "cpu", "tiny", 10.0)
    rows = _rows(text)
    assert not ok
    assert rows["paper grid wall time"][0] == "12.5 s"
    assert rows["TopK samples/s, fp32"][0] == "FAILED: the speed check timed out after 60 s"
    assert rows["harvest tokens/s"][0].endswith("exited 1: ValueError: no such layer")
    assert rows["same seed: CPU = CPU, 2nd process"][0] == "FAILED: row not written"


def test_a_comparison_outside_its_tolerance_fails_the_table(tmp_path):
    rows = [
        '{"row": "cpu_gpu", "setting": "s", "load_1m": 1.0, "na": "no GPU"}',
        '{"row": "cpu_cpu", "setting": "s", "load_1m": 1.0, "value": 3e-07, '
        '"unit": "max abs diff", "ok": false}',
    ]
    (tmp_path / "same-seed.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "same-seed.rc").write_text("0\n")
    text, ok = table(tmp_path, "cpu", "tiny", 10.0)
    assert not ok
    assert _rows(text)["same seed: CPU = CPU, 2nd process"][0] == "FAILED: 3e-07 max abs diff"
