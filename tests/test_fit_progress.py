"""The minutes-long fits show progress: FastICA counts its iterations, sparse coding its batches,
each on a bar (tqdm, on stderr) that `fit_grid(progress=False)` (the commands' --no-progress)
leaves out; drawing it changes no fitted number.
"""

from __future__ import annotations

import pytest
import torch

from test_baselines import RowsSource, config, planted
from unsuperpose.train.fitted import fit_grid
from unsuperpose.train.knobs import TOPK_ALL

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fit(src, cfg, progress, capsys):
    grid = fit_grid(src, cfg, progress=progress)
    return grid, capsys.readouterr().err


def test_ica_draws_a_bar_of_its_iterations_and_fits_the_same(capsys):
    x, _ = planted(3_000, 4, seed=5)
    src = RowsSource(x, x[:256])
    cfg = config("ica", [4], steps=20, batch_size=150)
    quiet, err_quiet = _fit(src, cfg, False, capsys)
    shown, err_shown = _fit(src, cfg, True, capsys)
    assert "ica n=4" not in err_quiet
    assert "ica n=4" in err_shown and f"/{cfg.ica.max_iter}" in err_shown
    a, b = quiet.fitted[(TOPK_ALL, 4)], shown.fitted[(TOPK_ALL, 4)]
    assert torch.equal(a.atoms(), b.atoms()) and torch.equal(a.encoder, b.encoder)
    assert a.config["iterations"] == b.config["iterations"]


def test_sparse_coding_draws_a_bar_of_its_batches_and_fits_the_same(capsys):
    x, _ = planted(2_000, 6, seed=6)
    src = RowsSource(x, x[:256])
    cfg = config("sparse-coding", [8], ks=(0.1,), steps=12, batch_size=64)
    quiet, err_quiet = _fit(src, cfg, False, capsys)
    shown, err_shown = _fit(src, cfg, True, capsys)
    assert "sparse-coding n=8" not in err_quiet
    assert "sparse-coding n=8" in err_shown and "/12" in err_shown
    assert torch.equal(quiet.fitted[(0.1, 8)].atoms(), shown.fitted[(0.1, 8)].atoms())
