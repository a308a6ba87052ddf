"""The fitted baselines (train/families/basis.py): the neuron basis, PCA, ICA, random directions.

Each is checked against a reference computed here (PCA against torch.linalg.svd, ICA against
planted independent sources), saved and loaded like any dictionary, refused at sizes it cannot
have, and run through `toy` and `train` like an SAE architecture.
"""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from unsuperpose.analyze.metrics import mcc
from unsuperpose.analyze.splice import splice_eval
from unsuperpose.cli import main
from unsuperpose.lm import load_bridge, token_blocks
from unsuperpose.train import SAETrainConfig, load_dictionary
from unsuperpose.train.families.basis import keep_largest
from unsuperpose.train.fitted import FitData, evaluate_dictionaries, fit_grid
from unsuperpose.train.knobs import TOPK_ALL
from unsuperpose.train.registry import FAMILIES, fitted_families, get_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RowsSource:
    """Fixed rows as an activation source: batch i of a stream is a seeded draw of rows."""

    def __init__(self, train: torch.Tensor, heldout: torch.Tensor):
        self.train, self.heldout = train.float(), heldout.float()

    @property
    def d(self) -> int:
        return self.train.shape[1]

    def batches(self, batch_size, *, seed=0, start=0):
        i = start
        while True:
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            yield self.train[torch.randint(len(self.train), (batch_size,), generator=g)]
            i += 1

    def heldout_batches(self, batch_size, max_rows):
        rows = self.heldout[:max_rows]
        yield from rows.split(batch_size)


def planted(rows: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent, positively skewed sources (exponential), mixed by a random matrix."""
    g = torch.Generator().manual_seed(seed)
    sources = torch.empty(rows, d).exponential_(generator=g) * (
        torch.rand(rows, d, generator=g) < 0.3
    )
    mixing = torch.randn(d, d, generator=g)  # columns: what each source adds to x
    return sources @ mixing.T + torch.randn(d, generator=g), mixing


def config(arch: str, sizes: list[int], ks=(TOPK_ALL,), **kw) -> SAETrainConfig:
    kw = {"steps": 40, "batch_size": 128, **kw}
    return SAETrainConfig(arch=arch, dict_sizes=sizes, sparsity=list(ks), **kw)


def test_every_baseline_is_a_fitted_family_with_the_topk_knob_but_sparse_coding():
    names = {f.name for f in fitted_families()}
    assert {"neurons", "pca", "ica", "random"} <= names
    for name in ("neurons", "pca", "ica", "random"):
        fam = FAMILIES[name]
        assert fam.fitted and fam.group is None and fam.knob.name == "k"
    assert not get_family("relu").fitted


def test_keep_largest_keeps_the_k_largest_magnitudes_with_their_signs():
    c = torch.tensor([[3.0, -5.0, 1.0, -0.5], [0.1, 0.2, -0.3, 0.0]])
    assert torch.equal(keep_largest(c, 2), torch.tensor([[3.0, -5.0, 0, 0], [0, 0.2, -0.3, 0]]))
    assert torch.equal(keep_largest(c, TOPK_ALL), c)


def test_pca_equals_the_svd_of_the_centred_training_rows():
    x, _ = planted(2_000, 6, seed=1)
    src = RowsSource(x, x[:256])
    cfg = config("pca", [4])
    data = FitData(src, cfg)
    rows = torch.cat(list(data.stream())).double()
    assert len(rows) == cfg.steps * cfg.batch_size
    centred = rows - rows.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    pca = fit_grid(src, cfg, progress=False).fitted[(TOPK_ALL, 4)]
    # the same four directions up to sign, in the same order, and the same variances
    cos = (pca.atoms().double() @ vh[:4].T).abs()
    assert torch.allclose(cos, torch.eye(4, dtype=torch.float64), atol=1e-4)
    expected = (s[:4] ** 2 / len(rows)).tolist()
    assert pca.config["explained_variance"] == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(pca.mean.double(), rows.mean(0), atol=1e-5)


def test_ica_unmixes_planted_independent_sources_and_its_atoms_are_the_mixing_columns():
    x, mixing = planted(6_000, 5, seed=2)
    src = RowsSource(x, x[:512])
    cfg = config("ica", [5], steps=40, batch_size=150)
    ica = fit_grid(src, cfg, progress=False).fitted[(TOPK_ALL, 5)]
    assert ica.config["converged"] and ica.config["fit_rows"] == 6_000
    # orientation makes the cosines positive: signed MCC with the true columns ~ 1
    assert mcc(mixing.T, ica.atoms()) > 0.99
    # and the unmixing rows are not the atoms (they would score far lower)
    assert mcc(mixing.T, ica.encoder.T) < 0.95


def test_directions_point_along_the_heavy_tail_of_their_coefficients():
    g = torch.Generator().manual_seed(3)
    # one sparse positive feature along -e0: PCA's top direction must be oriented to -e0
    on = torch.empty(4_000).exponential_(generator=g) * (torch.rand(4_000, generator=g) < 0.1)
    x = 0.05 * torch.randn(4_000, 3, generator=g)
    x[:, 0] -= 3 * on
    src = RowsSource(x, x[:256])
    pca = fit_grid(src, config("pca", [1]), progress=False).fitted[(TOPK_ALL, 1)]
    assert pca.atoms()[0, 0] < -0.99


@pytest.mark.parametrize("arch", ["neurons", "pca", "ica"])
def test_a_full_basis_with_every_coefficient_reconstructs_exactly(arch):
    x, _ = planted(3_000, 6, seed=4)
    src = RowsSource(x[:2_500], x[2_500:])
    cfg = config(arch, [6], ks=(TOPK_ALL, 2))
    grid = fit_grid(src, cfg, progress=False)
    metrics = evaluate_dictionaries(grid.saes(), src, cfg)
    full, sparse = metrics[(TOPK_ALL, 6)], metrics[(2, 6)]
    assert full["heldout_fvu"] < 1e-9
    assert sparse["heldout_l0"] <= 2 and sparse["heldout_fvu"] > 1e-3
    assert full["heldout_rows"] == 500


@pytest.mark.parametrize("arch", ["neurons", "pca", "ica", "random"])
def test_saved_baselines_load_back_as_themselves(arch, tmp_path):
    x, _ = planted(1_000, 6, seed=5)
    src = RowsSource(x, x[:100])
    size = 6 if arch != "random" else 9
    grid = fit_grid(src, config(arch, [size], ks=(3,)), progress=False)
    d = grid.fitted[(3, size)]
    d.save(tmp_path / arch)
    back = load_dictionary(tmp_path / arch)
    assert type(back) is type(d) and back.arch == arch and back.k == 3
    probe = x[:50]
    assert torch.equal(back.encode(probe), d.encode(probe))
    assert torch.equal(back.decode(back.encode(probe)), d.decode(d.encode(probe)))
    assert torch.equal(back.atoms(), d.atoms())
    assert (back.encode(probe) != 0).sum(1).max() <= 3


def test_sizes_a_method_cannot_have_are_refused_before_any_work():
    x, _ = planted(500, 4, seed=6)
    src = RowsSource(x, x[:50])
    with pytest.raises(ValueError, match="at most d = 4 directions"):
        fit_grid(src, config("pca", [2, 8]), progress=False)
    with pytest.raises(ValueError, match="exactly d = 4"):
        fit_grid(src, config("neurons", [3]), progress=False)
    fit_grid(src, config("random", [8]), progress=False)  # any size


def test_toy_fits_a_baseline_with_topk_all(tmp_path, capsys):
    out = tmp_path / "ica"
    args = ["toy", "--arch", "ica", "--h", "8", "--g", "16", "--k", "2", "--dict-sizes"]
    args += ["1/4x,1/2x", "--topk", "2,all", "--steps", "30", "--batch-size", "64"]
    assert main([*args, "--out", str(out), "--wandb", "disabled", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["arch"], r["sparsity_name"], r["dict_size"]) for r in rows} == {
        ("ica", "k", "4"),
        ("ica", "k", "8"),
    }
    assert {r["sparsity"] for r in rows} == {"2", "0"}
    assert all(float(r["mmcs"]) > 0 and float(r["mcc"]) <= 0.5 for r in rows)
    assert (out / "saes" / "ica-n8-k_all").is_dir()
    assert "fitted baseline" in capsys.readouterr().out
    # too large for ICA: one line naming the flag, nothing written
    bad = tmp_path / "bad"
    args[args.index("1/4x,1/2x")] = "1x"
    assert main([*args, "--out", str(bad), "--wandb", "disabled"]) == 2
    assert "at most d = 8" in capsys.readouterr().err
    assert not (bad / "summary.csv").exists()


@pytest.mark.slow
def test_train_fits_pca_on_a_store_and_full_rank_bases_splice_in_exactly(
    analyze_runs, tiny_corpus, tiny_lm_dir, tmp_path
):
    store = analyze_runs / "acts" / "tiny" / "layer1.zarr"
    common = ["--store", str(store), "--out", str(tmp_path), "--dict-sizes", "1x", "--steps", "20"]
    common += ["--batch-size", "64", "--splice-tokens", "60", "--wandb", "disabled"]
    fitted = {}
    for arch in ("pca", "neurons"):
        assert main(["train", *common, "--arch", arch, "--topk", "8,all", "--no-progress"]) == 0
        rows = list(csv.DictReader(open(tmp_path / f"{arch}-1x" / "summary.csv")))
        by_k = {r["sparsity"]: r for r in rows}
        assert set(by_k) == {"8", "0"} and {r["arch"] for r in rows} == {arch}
        full = by_k["0"]
        assert float(full["heldout_fvu"]) < 1e-6 and float(full["kl"]) < 1e-6
        assert abs(float(full["delta_ce"])) < 1e-6
        assert float(by_k["8"]["heldout_l0"]) <= 8
        assert float(by_k["8"]["kl"]) > 1e-6
        fitted[arch] = load_dictionary(tmp_path / f"{arch}-1x" / "saes" / f"{arch}-n64-k_all")
    # CE recovered divides by what zero-ablating the layer costs, which is ~3e-5 nats on the
    # random test LM: float rounding alone would move it by 1e-3. On a copy with the layer-1 MLP
    # output and the embeddings scaled up the ablation costs ~0.07 nats, and full-rank bases
    # (exact for any input, not only the rows they were fitted on) must recover it to 1e-4.
    scaled = tmp_path / "scaled-lm"
    shutil.copytree(tiny_lm_dir, scaled)
    weights = load_file(scaled / "model.safetensors")
    weights["transformer.h.1.mlp.c_proj.weight"] *= 30
    weights["transformer.wte.weight"] *= 20  # sharper logits (tied unembedding)
    save_file(weights, scaled / "model.safetensors", metadata={"format": "pt"})
    blocks = [np.asarray(b, dtype=np.int64) for b in token_blocks(tiny_corpus, 32, "val").blocks]
    r = splice_eval(
        load_bridge(scaled),
        "blocks.1.mlp.hook_post",
        blocks[:6],
        {a: (lambda x, d=d: d.decode(d.encode(x))) for a, d in fitted.items()},
        mean=fitted["pca"].mean,
        progress=False,
    )
    assert abs(r["ce_zero"] - r["ce_clean"]) > 0.05
    for arch in fitted:
        assert r["saes"][arch]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
