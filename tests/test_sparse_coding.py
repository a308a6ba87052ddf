"""The sparse-coding baseline: FISTA against scikit-learn's lasso, planted dictionaries recovered,
the saved folder read back exactly, and the identity dictionary's soft threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import sparse_encode

from unsuperpose.seeding import seeded_generator
from unsuperpose.train import SAETrainConfig
from unsuperpose.train.config import SparseCodingOptions
from unsuperpose.train.dictionary import load_dictionary
from unsuperpose.train.families.sparse_coding import (
    OnlineDictionaryLearner,
    SparseCodingDictionary,
    fista,
)
from unsuperpose.train.fitted import FitData
from unsuperpose.train.registry import get_family


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a shared machine a second thread only waits for the first
    (a FISTA of 3,000 small steps takes 0.2 s on one thread and 5-20 s on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True)


def lasso_objective(x, D, c, alpha):
    """Per row: 0.5 ||x - c D||^2 + alpha ||c||_1, the objective both solvers claim to minimise."""
    return 0.5 * ((x - c @ D) ** 2).sum(1) + alpha * np.abs(c).sum(1)


class PlantedSource:
    """x = codes @ atoms: each row has each of the G unit atoms on with probability k / G, at a
    magnitude uniform in [0.5, 1.5]; batch i drawn from its own seed."""

    def __init__(self, atoms: torch.Tensor, k: float = 3.0):
        self.atoms, self.k = atoms, k

    @property
    def d(self) -> int:
        return self.atoms.shape[1]

    def batches(self, batch_size, *, seed=0, start=0):
        i = start
        while True:
            gen = seeded_generator(seed, i, 5)
            G = len(self.atoms)
            on = torch.rand(batch_size, G, generator=gen) < self.k / G
            size = 0.5 + torch.rand(batch_size, G, generator=gen)
            yield (on * size) @ self.atoms
            i += 1


def planted(d=24, G=32, seed=3):
    return unit_rows(torch.randn(G, d, generator=seeded_generator(seed, 1)))


def fit(source, n, l1, steps=150, batch_size=128, **options):
    cfg = SAETrainConfig(
        arch="sparse-coding",
        sparsity=l1,
        dict_sizes=[n],
        steps=steps,
        batch_size=batch_size,
        seed=1,
        data_seed=2,
        sparse_coding=SparseCodingOptions(**options),
    )
    return get_family("sparse-coding").fit(FitData(source, cfg), cfg, n)


@pytest.mark.parametrize("positive", [True, False])
def test_fista_solves_sklearns_lasso(positive):
    """sparse_encode(lasso_cd) divides alpha by d and ``Lasso`` divides the squared error by d
    (its n_samples), so its alpha is ours: the codes must agree to 1e-5, and a wrong scale of
    alpha (alpha / d, alpha * 2) would move them by far more than that."""
    gen = torch.Generator().manual_seed(0)
    n, d, b, alpha = 40, 20, 30, 0.4
    D = unit_rows(torch.randn(n, d, generator=gen, dtype=torch.float64))
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    ref = sparse_encode(
        x.numpy(), D.numpy(), algorithm="lasso_cd", alpha=alpha, positive=positive, max_iter=5000
    )
    ours = fista(x, D, alpha, iters=3000, positive=positive).numpy()
    assert 2 <= (ref != 0).sum(1).mean() <= n / 2  # a sparse, non-trivial solution
    assert np.abs(ours - ref).max() < 1e-5
    assert (
        np.abs(
            lasso_objective(x.numpy(), D.numpy(), ours, alpha)
            - lasso_objective(x.numpy(), D.numpy(), ref, alpha)
        ).max()
        < 1e-8
    )
    for wrong in (alpha / d, 2 * alpha):
        assert np.abs(fista(x, D, wrong, 3000, positive).numpy() - ref).max() > 1e-2
    if positive:
        assert (ours >= 0).all()
    # Stacked dictionaries, one alpha each, by the thin-product path (n > 2d): the lasso again.
    wide = [unit_rows(torch.randn(3 * d, d, generator=gen, dtype=torch.float64)) for _ in "ab"]
    stacked = fista(x, torch.stack(wide), torch.tensor([alpha, 0.6]), 3000, positive)
    for D_s, alpha_s, codes in zip(wide, (alpha, 0.6), stacked, strict=True):
        ref = sparse_encode(
            x.numpy(),
            D_s.numpy(),
            algorithm="lasso_cd",
            alpha=alpha_s,
            positive=positive,
            max_iter=5000,
        )
        assert np.abs(codes.numpy() - ref).max() < 1e-5


def test_identity_dictionary_soft_thresholds():
    """With D = I the lasso separates per coordinate: codes are x soft-thresholded by alpha
    (and by alpha after the stored scale in the dictionary), exactly."""
    gen = torch.Generator().manual_seed(1)
    d, alpha = 16, 0.3
    x = torch.rand(50, d, generator=gen) * (torch.rand(50, d, generator=gen) < 0.2)
    eye = torch.eye(d)
    torch.testing.assert_close(fista(x, eye, alpha, 10), torch.relu(x - alpha), rtol=0, atol=0)
    signed = x - x.flip(1)
    expected = torch.sign(signed) * torch.relu(signed.abs() - alpha)
    torch.testing.assert_close(fista(signed, eye, alpha, 10, positive=False), expected)
    scale = torch.tensor(2.0)
    sc = SparseCodingDictionary(
        {"W_dec": eye, "mean": torch.zeros(d), "scale": scale},
        {"alpha": alpha, "iters": 10, "positive": True, "fit_rows": 0},
    )
    torch.testing.assert_close(sc.encode(x), torch.relu(x / scale - alpha), rtol=0, atol=0)
    kept = sc.encode(x) > 0  # where the threshold kept the coordinate, decode shrinks it by alpha
    torch.testing.assert_close(sc.decode(sc.encode(x))[kept], (x - alpha * scale)[kept])


def test_learning_recovers_planted_atoms():
    """Rows made of ~3 of 32 planted unit atoms (non-negative codes): one pass of online
    dictionary learning finds them (MMCS > 0.9 at each alpha), the atoms are unit rows, a larger
    alpha gives fewer active codes, and a second fit is bit-identical."""
    truth = planted()
    source = PlantedSource(truth)
    alphas = [0.05, 0.2]
    fitted = fit(source, 32, alphas, iters=50)
    assert sorted(fitted) == alphas
    l0 = {}
    x = torch.cat([next(source.batches(512, seed=99))])
    for alpha, sc in fitted.items():
        atoms = sc.atoms()
        torch.testing.assert_close(atoms.norm(dim=1), torch.ones(32))
        mmcs = float((truth @ atoms.T).max(dim=1).values.mean())
        assert mmcs > 0.9, (alpha, mmcs)
        assert sc.config["fit_rows"] == 150 * 128
        l0[alpha] = float((sc.encode(x) != 0).sum(1).float().mean())
    assert l0[0.2] < l0[0.05]
    again = fit(source, 32, alphas, iters=50)
    assert torch.equal(again[0.2].W_dec, fitted[0.2].W_dec)


def test_save_load_round_trip(tmp_path):
    """A fitted dictionary saved and read back by ``load_dictionary`` encodes and decodes
    identically, and ``.to`` moves every tensor it uses."""
    sc = fit(PlantedSource(planted()), 40, [0.05], steps=5, iters=20)[0.05]
    sc.save(tmp_path / "sc", config={"run": "test"})
    back = load_dictionary(tmp_path / "sc")
    assert isinstance(back, SparseCodingDictionary)
    assert back.config["run"] == "test" and back.config["alpha"] == 0.05
    assert (back.d_in, back.d_sae) == (24, 40)
    x = next(PlantedSource(planted()).batches(64, seed=7))
    assert torch.equal(back.encode(x), sc.encode(x))
    assert torch.equal(back.decode(sc.encode(x)), sc.decode(sc.encode(x)))
    for name in ("W_dec", "mean", "scale", "lipschitz"):
        assert torch.equal(getattr(back, name), getattr(sc, name))
    moved = back.to(torch.float64).to("cpu")
    assert moved.lipschitz.dtype == torch.float64


def test_an_unused_atom_is_replaced_by_a_data_row():
    """Rows in the first 4 coordinates never use an atom along the 8th (no gradient reaches its
    code): after ``resample_rows`` rows it is a unit data row of the batch, with its statistics
    zeroed; the atoms the rows used stay unit rows, not replaced."""
    gen = torch.Generator().manual_seed(4)
    x = torch.zeros(64, 8)
    x[:, :4] = torch.rand(64, 4, generator=gen)
    init = torch.zeros(6, 8)
    init[:5, :4] = torch.rand(5, 4, generator=gen)
    init[5, 7] = 1.0
    init = unit_rows(init)
    learner = OnlineDictionaryLearner(
        init, [0.01], iters=30, positive=True, forget=0.0, resample_rows=64, generator=gen
    )
    learner.step(x)
    atom = learner.D[0, 5]
    assert atom[7] == 0
    assert torch.isclose(unit_rows(x) @ atom, torch.tensor(1.0)).any()
    assert not learner.A[0, 5].any() and not learner.A[0, :, 5].any()
    assert not learner.B[0, 5].any()
    torch.testing.assert_close(learner.D[0].norm(dim=1), torch.ones(6))
    used = learner.idle_rows[0, :5] == 0
    assert used.any()
    assert (learner.D[0, :5][used, 4:] == 0).all()  # updated within the data's span
