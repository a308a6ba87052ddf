"""Run folders written before the architecture registry still load, report and resume.

The fixtures (tests/fixtures/old_runs/, see its README) keep the knob where configs kept it then:
one field per knob (``l1``, ``top_k``, ``l0_coef``), all three in every train_config.json and
checkpoint. Today's config has one list, ``sparsity``; ``SAETrainConfig.upgrade_saved`` reads
the old spelling, so an old run is the same run as the command that made it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from unsuperpose.analyze.report import toy_record
from unsuperpose.cli import main
from unsuperpose.train import load_saes
from unsuperpose.train.io import read_train_config

OLD = Path(__file__).parent / "fixtures" / "old_runs"
TOY = ["toy", "--h", "8", "--g", "16", "--k", "2", "--decay", "0.95", "--seed", "0"]
RUN = ["--dict-sizes", "1x,2x", "--steps", "20", "--batch-size", "32", "--log-every", "5"]
RUN += ["--eval-every", "10", "--no-progress", "--wandb", "disabled"]
KNOBS = {"relu": ["--l1", "1e-3,1e-2"], "topk": ["--arch", "topk", "--topk", "2,4"]}


@pytest.mark.parametrize(("arch", "values"), [("relu", [1e-3, 1e-2]), ("topk", [2, 4])])
def test_an_old_grid_loads_and_reports(arch, values):
    cfg, _ = read_train_config(OLD / arch)
    assert (cfg.arch, cfg.sparsity) == (arch, values)
    saes = load_saes(OLD / arch)
    assert set(saes) == {(v, n) for v in values for n in (16, 32)}
    assert {d.arch for d in saes.values()} == {arch}
    record = toy_record(OLD / arch, 16)
    assert record["truth"] == {"size": 16, "ratio": 1.0} and record["pointers"]


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_the_command_that_made_an_old_grid_finds_it_is_the_same(arch, tmp_path, capsys):
    out = tmp_path / arch
    shutil.copytree(OLD / arch, out)
    assert main([*TOY, *RUN, *KNOBS[arch], "--out", str(out)]) == 0
    assert "already holds this grid (same settings, data and budget)" in capsys.readouterr().out


def test_an_old_checkpoint_resumes(tmp_path, capsys, one_torch_thread):
    out = tmp_path / "run"
    shutil.copytree(OLD / "relu-unfinished", out)
    assert main([*TOY, *RUN, *KNOBS["relu"], "--out", str(out)]) == 0
    assert "resuming from the checkpoint at step 10 of 20" in capsys.readouterr().out
    cfg, _ = read_train_config(out)
    assert cfg.sparsity == [1e-3, 1e-2] and not (out / "checkpoint").exists()
