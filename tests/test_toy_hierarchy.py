"""Toy data where counting is hard: SynthSAEBench's hierarchy and low-rank correlation."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

from unsuperpose.cli import main
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.toy.hierarchy import build_forest, forest_parents, scale_children
from unsuperpose.toy.sampling import (
    dead_window_for,
    lowrank_factor,
    lowrank_normals,
    zipf_probabilities,
)

N = 200_000  # samples for the rate tests: a binomial rate's standard error is below 1.2e-3


def _active(src: ToySource, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    _, codes = src.sample(n, seed=1)
    return codes > 0, codes


def _sibling_groups(src: ToySource) -> list[np.ndarray]:
    parent = src.forest.parent.numpy()
    return [np.flatnonzero(parent == p) for p in np.unique(parent[parent >= 0])]


def test_trees_take_the_commonest_features_breadth_first_and_stop_at_G():
    parent, levels = forest_parents(G=30, roots=2, branching=3, depth=2)
    assert levels == [(2, 8), (8, 26)]
    assert parent[:2].tolist() == [-1, -1]  # roots: the two commonest features
    assert parent[2:8].tolist() == [0, 0, 0, 1, 1, 1]
    assert parent[8:26].tolist() == [p for p in range(2, 8) for _ in range(3)]
    assert (parent[26:] == -1).all()  # free features
    parent, levels = forest_parents(G=10, roots=2, branching=3, depth=2)
    assert levels == [(2, 8), (8, 10)] and parent[8:].tolist() == [2, 2]  # truncated at G


def test_a_childs_probability_is_its_parents_times_its_conditional_one():
    # root 0 (0.5): children 2, 3 want 0.1 and 0.2 (sum 0.3 < 0.5): kept, with 0.4 of the
    # root's samples carrying no child. Root 1 (0.2): children 4, 5 want 0.15 and 0.25, more
    # than their parent: they share it 3:5, and the root always carries one of them.
    targets = torch.tensor([0.5, 0.2, 0.1, 0.2, 0.15, 0.25], dtype=torch.float64)
    forest, p = build_forest(6, roots=2, branching=2, depth=1, targets=targets)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.2, 0.1, 0.2, 0.075, 0.125]).double())
    (lv,) = forest.levels
    assert lv.parents.tolist() == [0, 0, 1, 1] and lv.groups.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(lv.lo, torch.tensor([0.0, 0.2, 0.0, 0.375]))
    torch.testing.assert_close(lv.hi, torch.tensor([0.2, 0.6, 0.375, 1.0]))
    assert forest.depth.tolist() == [0, 0, 1, 1, 1, 1] and forest.n_groups == 2


@pytest.mark.parametrize(
    "extra",
    [
        {},  # the block copula on the roots and free features
        {"correlation_structure": "lowrank"},
        {"correlation": 0.0},
        {"correlation_recipe": "report"},
    ],
)
def test_hierarchical_samples_keep_every_rule_and_every_stated_rate(extra):
    cfg = ToyConfig(h=16, G=96, frequencies="zipf", hierarchy=True, hierarchy_depth=2, seed=21)
    src = ToySource(ToyConfig(**{**vars(cfg), **extra}))
    parent = src.forest.parent  # 4 trees of 1 + 4 + 16 features, 12 features free
    assert int((parent >= 0).sum()) == 80 and int((src.forest.depth == 0).sum()) == 4
    sums = [float(src.forest.levels[-1].hi[i]) for i in range(63, 0, -4)]
    assert max(sums) > 0.999 and min(sums) < 0.9  # saturated groups and groups with room
    on, _ = _active(src)
    kids = torch.nonzero(parent >= 0).squeeze(1)
    # a child never fires without its parent
    assert not (on[:, kids] & ~on[:, parent[kids]]).any()
    # at most one sibling fires
    for group in _sibling_groups(src):
        assert int(on[:, group].sum(1).max()) <= 1
    # every feature fires at its stated (true) rate, within 5 binomial standard errors
    rate = on.double().mean(0)
    p = src.probs
    assert (rate - p).abs().le(5 * (p * (1 - p) / N).sqrt() + 1e-12).all()


def test_a_childs_coefficient_is_scaled_by_its_parents():
    forest, _ = build_forest(
        4, roots=1, branching=2, depth=2, targets=torch.tensor([0.5, 0.2, 0.2, 0.1]).double()
    )
    codes = torch.tensor([[0.8, 0.5, 0.0, 0.25], [0.3, 0.0, 0.9, 0.0]])
    # child 1 of root 0: 0.5 * 0.8 / 0.5; grandchild 3 of child 1: 0.25 * (0.8) / 0.5
    want = torch.tensor([[0.8, 0.8, 0.0, 0.4], [0.3, 0.0, 0.54, 0.0]])
    torch.testing.assert_close(scale_children(codes.clone(), forest), want)
    # in the samples: a child's value over its parent's is its own U(0, 1) over 1/2, whatever
    # the parent's value, so each level keeps mean 1/2
    src = ToySource(ToyConfig(h=16, G=96, frequencies="zipf", hierarchy=True, seed=22))
    on, codes = _active(src)
    kids = torch.nonzero(src.forest.parent >= 0).squeeze(1)
    both = on[:, kids]
    ratio = (codes[:, kids] / codes[:, src.forest.parent[kids]].clamp_min(1e-30))[both]
    parent_value = codes[:, src.forest.parent[kids]][both]
    m = ratio.numel()
    assert float(ratio.max()) <= 2 + 1e-5  # U(0, 2): mean 1, variance 1/3
    assert abs(float(ratio.mean()) - 1) < 5 * math.sqrt(1 / 3 / m)
    assert abs(float(torch.corrcoef(torch.stack([ratio, parent_value]))[0, 1])) < 5 / math.sqrt(m)
    for d in range(4):
        level = codes[:, src.forest.depth == d][on[:, src.forest.depth == d]]
        assert abs(float(level.mean()) - 0.5) < 0.01, d


def test_lowrank_normals_have_the_stated_correlation():
    gen = torch.Generator().manual_seed(3)
    factor, private_sd = lowrank_factor(12, rank=3, scale=0.4, gen=gen)
    stated = (factor.double() @ factor.double().T).fill_diagonal_(1.0)
    torch.testing.assert_close((factor**2).sum(1) + private_sd**2, torch.ones(12))
    z = lowrank_normals(N, factor, private_sd, torch.Generator().manual_seed(4))
    seen = torch.corrcoef(z.double().T)
    off = ~torch.eye(12, dtype=torch.bool)
    assert float(stated[off].abs().max()) > 0.2  # strong enough that a wrong matrix would show
    # a sample correlation's standard error is (1 - rho^2) / sqrt(n)
    assert (seen - stated)[off].abs().le(5 * (1 - stated[off] ** 2) / math.sqrt(N)).all()
    torch.testing.assert_close(z.var(0), torch.ones(12), atol=0.02, rtol=0)


def test_lowrank_factor_keeps_one_percent_private_variance():
    gen = torch.Generator().manual_seed(0)
    factor, private_sd = lowrank_factor(64, rank=25, scale=1.0, gen=gen)
    assert float((factor**2).sum(1).max()) == pytest.approx(0.99, abs=1e-5)
    assert float(private_sd.min()) == pytest.approx(0.1, abs=1e-4)


def test_lowrank_copula_fires_pairs_together_as_the_bivariate_normal_says():
    # feature i is on when Phi(z_i) < p_i: a pair fires together with the bivariate normal's
    # probability at (Phi^-1(p_i), Phi^-1(p_j)) and correlation rho_ij
    cfg = ToyConfig(h=8, G=16, k=4, decay=0.9, correlation_structure="lowrank", lowrank_rank=2)
    src = ToySource(ToyConfig(**{**vars(cfg), "lowrank_scale": 0.6}))
    factor = src.lowrank[0].double()
    rho = factor @ factor.T
    on = _active(src)[0].double()
    joint = on.T @ on / N
    p = src.probs
    rho.fill_diagonal_(0)
    i, j = divmod(int(rho.abs().argmax()), 16)
    assert abs(float(rho[i, j])) > 0.4
    cov = [[1.0, float(rho[i, j])], [float(rho[i, j]), 1.0]]
    corner = [norm.ppf(float(p[i])), norm.ppf(float(p[j]))]
    want = float(multivariate_normal(mean=[0, 0], cov=cov).cdf(corner))
    se = math.sqrt(want * (1 - want) / N)
    assert abs(float(joint[i, j]) - want) < 5 * se
    assert abs(float(p[i] * p[j]) - want) > 20 * se  # independence would be far off
    assert (on.mean(0) - p).abs().le(5 * (p * (1 - p) / N).sqrt()).all()


def test_hierarchy_and_lowrank_are_reproducible_from_the_seed():
    cfg = ToyConfig(h=16, G=64, frequencies="zipf", hierarchy=True, correlation_structure="lowrank")
    a, b = ToySource(cfg), ToySource(cfg)
    assert torch.equal(a.sample(500, seed=2)[1], b.sample(500, seed=2)[1])
    assert torch.equal(a.lowrank[0], b.lowrank[0]) and torch.equal(a.probs, b.probs)
    first = [x for x, _ in zip(a.batches(32, seed=1), range(4))]
    assert torch.equal(next(b.batches(32, seed=1, start=3)), first[3])
    other = ToySource(ToyConfig(**{**vars(cfg), "seed": 1}))
    assert not torch.equal(other.sample(500, seed=2)[1], a.sample(500, seed=2)[1])
    assert not torch.equal(other.lowrank[0], a.lowrank[0])


def test_the_new_modes_are_part_of_the_datas_identity():
    base = dict(h=16, G=64, frequencies="zipf")
    plain = ToySource(ToyConfig(**base)).describe()
    assert not {"hierarchy", "hierarchy_roots", "correlation_structure", "lowrank_rank"} & set(
        plain
    )
    tree = ToySource(ToyConfig(**base, hierarchy=True)).describe()
    assert tree["hierarchy"] and tree["hierarchy_depth"] == 3
    deeper = ToySource(ToyConfig(**base, hierarchy=True, hierarchy_depth=2)).describe()
    low = ToySource(ToyConfig(**base, correlation_structure="lowrank")).describe()
    assert low["lowrank_rank"] == 25 and "correlation" not in low and "group_size" not in low
    prints = {d["fingerprint"] for d in (plain, tree, deeper, low)}
    assert len(prints) == 4


def test_the_dead_window_reads_the_true_marginals_not_the_targets():
    # one tree over flat targets (0.4 down to 0.3): every sibling group outweighs its parent, so
    # the 16 grandchildren fire ~16 times less often than their targets
    cfg = ToyConfig(G=21, h=8, frequencies="zipf", p_min=0.3, hierarchy=True, hierarchy_roots=1)
    src = ToySource(cfg)
    targets = zipf_probabilities(21, 0.5, 0.4, 0.3)
    parent = src.forest.parent
    kids = torch.nonzero(parent >= 0).squeeze(1)
    assert bool((src.probs[kids] <= src.probs[parent[kids]] + 1e-15).all())
    assert float(src.probs.min()) < float(targets.min()) / 10
    assert src.dead_window(256) == dead_window_for(src.probs, 256) > dead_window_for(targets, 256)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(hierarchy_roots=0), "hierarchy_roots"),
        (dict(hierarchy_branching=1), "hierarchy_branching"),
        (dict(hierarchy_depth=0), "hierarchy_depth"),
        (dict(lowrank_rank=0), "lowrank_rank"),
        (dict(lowrank_scale=-0.1), "lowrank_scale"),
        (dict(correlation_structure="wishart"), "correlation_structure"),
    ],
)
def test_invalid_hierarchy_and_lowrank_settings_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ToyConfig(**kwargs)


def test_toy_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        main(["toy", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--hierarchy",
        "--no-hierarchy",
        "--hierarchy-roots",
        "--hierarchy-branching",
        "--hierarchy-depth",
        "--correlation-structure",
        "--lowrank-rank",
        "--lowrank-scale",
    ):
        assert flag in text, flag


def test_toy_cli_runs_on_hierarchical_lowrank_data(tmp_path, capsys):
    import csv
    import json

    out = tmp_path / "toy"
    argv = ["toy", "--out", str(out), "--h", "16", "--g", "32", "--frequencies", "zipf"]
    argv += ["--hierarchy", "--hierarchy-roots", "2", "--correlation-structure", "lowrank"]
    argv += ["--steps", "40", "--batch-size", "64", "--l1", "1e-3,1e-2"]
    argv += ["--dict-sizes", "1/2x,1x", "--eval-every", "20", "--wandb", "disabled"]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "32 features in 2 trees" in printed and "low-rank correlation (rank 25" in printed
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 4 and all(0 < float(r["mmcs"]) <= 1 for r in rows)
    source = json.loads((out / "source.json").read_text())
    assert source["hierarchy"] and source["correlation_structure"] == "lowrank"
    assert (out / "diagnosis.json").exists()
