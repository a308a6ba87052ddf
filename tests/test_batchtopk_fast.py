"""The batchtopk and matryoshka families' sparse CPU steps are fast paths of their autograd
groups: step by step the same gradients, parameters, Adam moments, threshold, dead counters,
statistics and firing counts, AuxK included, every Matryoshka prefix's loss included; and
through the trainer the same trained grid."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from fast_paths import (
    AUXK_REGIMES,
    SRC,
    assert_auxk_regime,
    assert_off_the_cpu_it_is_autograd,
    perturb,
    record_steps,
    watch_auxk,
)
from unsuperpose.train import FAMILIES, SAETrainConfig, get_family, new_state, train_steps
from unsuperpose.train.config import AuxKOptions, BatchTopKOptions
from unsuperpose.train.families.auxk import dead_for_auxk
from unsuperpose.train.families.batchtopk import BatchTopKGroup
from unsuperpose.train.families.batchtopk_fast import BatchTopKFastGroup
from unsuperpose.train.families.matryoshka import MatryoshkaGroup
from unsuperpose.train.families.matryoshka_fast import MatryoshkaFastGroup

N, B, STEPS, VALUES = 24, 32, 30, [2, 5, 3]
GROUPS = {
    "batchtopk": (BatchTopKFastGroup, BatchTopKGroup),
    "matryoshka": (MatryoshkaFastGroup, MatryoshkaGroup),
}
TOL = dict(atol=2e-5, rtol=1e-4)


def make(arch, fast, values=VALUES, plant=False, **options):
    cfg = SAETrainConfig(
        arch=arch,
        sparsity=values,
        dict_sizes=[N],
        batch_size=B,
        lr=3e-3,
        steps=STEPS,  # the threshold is averaged from step 6 (threshold_from 0.2)
        **options,
    )
    g = GROUPS[arch][0 if fast else 1](SRC.d, N, values, cfg, seed=0)
    perturb(g, plant)
    return g


def run(g, steps=STEPS):
    return record_steps(g, B, steps)


def assert_same_training(arch, values, plant, options):
    fast = make(arch, True, values, plant, **options)
    slow = make(arch, False, values, plant, **options)
    assert fast.fast and type(slow) is GROUPS[arch][1]
    rec_fast, opt_fast = run(fast)
    rec_slow, opt_slow = run(slow)
    for step, (a, b) in enumerate(zip(rec_fast, rec_slow, strict=True), 1):
        assert a.keys() == b.keys()
        for name in b:
            where = f"{name}, step {step}"
            if name == "fired reduction":
                assert torch.equal(a[name], b[name]), where
            else:
                assert_close(a[name], b[name], **TOL, msg=lambda m, w=where: f"{w}: {m}")
    for name, t in slow.named_parameters().items():
        mine = fast.named_parameters()[name]
        assert_close(mine, t, **TOL, msg=lambda m, w=name: f"{w}: {m}")
        for moment in ("exp_avg", "exp_avg_sq"):
            assert_close(
                opt_fast.state[mine][moment],
                opt_slow.state[t][moment],
                **TOL,
                msg=lambda m, w=f"{name} {moment}": f"{w}: {m}",
            )
    for name, t in slow.buffers.items():  # the threshold: estimated, and equal
        assert (t > 0).all()
        assert_close(fast.buffers[name], t, **TOL)
    assert torch.equal(fast.since_fired, slow.since_fired)
    assert_close(fast.stats, slow.stats, rtol=1e-5, atol=1e-6)
    assert fast.stat_rows == slow.stat_rows
    return fast, rec_slow


CASES = {
    "no AuxK": dict(auxk=AuxKOptions(coef=0.0)),
    "AuxK on, no latent silent for 1000 steps": dict(),
    "planted dead, k_aux 5": dict(dead_window=1, auxk=AuxKOptions(coef=0.5), plant=True),
    "planted dead, k_aux 2": dict(dead_window=2, auxk=AuxKOptions(coef=1.0, k_aux=2), plant=True),
    "dead by a short window": dict(dead_window=1, auxk=AuxKOptions(coef=0.3, k_aux=40)),
}
KNOBS = {"k 2,5,3": VALUES, "k 4": [4], "k 1,30 (30 capped at n)": [1, 30]}


@pytest.mark.parametrize("values", list(KNOBS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", list(GROUPS))
def test_the_sparse_step_equals_the_autograd_group(arch, case, values):
    options = dict(CASES[case])
    plant = options.pop("plant", False)
    fast, rec = assert_same_training(arch, KNOBS[values], plant, options)
    # The candidate floor served every selection but those keeping the whole batch (k = n).
    assert fast.full_ranks == STEPS * sum(k >= N for k in KNOBS[values])
    # A latent that did not fire gets a gradient from AuxK only: it did where latents were dead.
    silent_grad = [
        (r["W_enc grad"].view(-1, fast.S, N).abs().sum(0) * (r["fired reduction"] == 0)).sum()
        for r in rec
    ]
    assert (sum(silent_grad) > 0) == ("dead" in case)


@pytest.mark.parametrize("regime", list(AUXK_REGIMES))
@pytest.mark.parametrize("arch", list(GROUPS))
def test_auxk_on_the_dead_block_equals_the_autograd_group(arch, regime, monkeypatch):
    """Planted dead latents, AuxK's gradient large (coefficient 0.5-1): step by step the same
    training (gradients, parameters, Adam moments, threshold), whichever way AuxK went."""
    seen = watch_auxk(monkeypatch, regime)
    assert_same_training(arch, VALUES, True, dict(AUXK_REGIMES[regime][0], dead_window=2))
    assert_auxk_regime(seen, regime)


@pytest.mark.parametrize("arch", list(GROUPS))
def test_a_floor_too_high_ranks_the_whole_batch_and_changes_nothing(arch, monkeypatch):
    """A batch unlike its sampled rows: fewer than B*k entries above the floor."""
    monkeypatch.setattr(BatchTopKFastGroup, "candidate_floor", lambda self, p, k: 1e9)
    options = dict(dead_window=1, auxk=AuxKOptions(coef=0.5))
    fast, _ = assert_same_training(arch, VALUES, True, options)
    assert fast.full_ranks == STEPS * len(VALUES)


def test_the_selection_is_the_batch_top_b_times_k_at_a_sampled_size():
    """Rows sampled with a stride (B > 2048 / k): the kept set is exactly the batch's top B*k."""
    g = make("batchtopk", True, [16])
    gen = torch.Generator().manual_seed(3)
    for shift in (0.0, -3.0, 3.0):  # mostly positive, few positives (< B*k), all positive
        p = torch.randn(512, 300, generator=gen) + shift
        p[:7] += 2.0  # rows unlike the others: they keep more than k
        idx, vals = g.select(p, 16)
        want_vals, want_idx = torch.relu(p).reshape(-1).topk(512 * 16)
        assert torch.equal(idx, idx.sort().values)
        assert_close(vals.clamp(min=0), torch.relu(p).reshape(-1)[idx])
        kept = torch.zeros(p.numel(), dtype=torch.bool)
        kept[idx] = True
        positive = want_vals > 0  # zeros may be any of the non-positive entries
        assert kept[want_idx[positive]].all()
        assert int((vals > 0).sum()) == int(positive.sum())
    assert g.full_ranks == 0


@pytest.mark.parametrize("arch", list(GROUPS))
def test_the_family_trains_the_fast_group_and_tests_it_against_autograd(arch):
    family = get_family(arch)
    assert (family.group, family.reference) == GROUPS[arch]


@pytest.mark.parametrize("arch", list(GROUPS))
def test_off_the_cpu_the_group_is_the_autograd_step(arch, monkeypatch):
    assert_off_the_cpu_it_is_autograd(make(arch, True), make(arch, False), B, monkeypatch)


@pytest.mark.parametrize("arch", list(GROUPS))
def test_the_trainer_trains_the_fast_group_like_the_autograd_one(arch, monkeypatch):
    """Two sizes, two k, AuxK with latents dead by a short window, the threshold averaged from
    step 8: the trainer's grid equals the one its autograd groups train, within float error.
    (Not n = d: a square orthogonal init reconstructs almost exactly, its first gradients are
    rounding noise and Adam's normalisation blows that noise up to lr-sized steps.)"""
    cfg = SAETrainConfig(
        arch=arch,
        sparsity=[2, 4],
        dict_sizes=[24, 48],
        steps=40,
        batch_size=64,
        dead_window=2,
        log_every=10,
        auxk=AuxKOptions(coef=0.5, k_aux=4),
        batchtopk=BatchTopKOptions(threshold_from=0.2),
    )
    dead_steps = []
    fast = train_steps(
        new_state(SRC, cfg),
        SRC,
        on_step=lambda st: dead_steps.append(any(dead_for_auxk(g).any() for g in st.groups)),
        progress=False,
    )
    assert sum(dead_steps) >= 5  # AuxK had dead latents to revive
    family = get_family(arch)
    monkeypatch.setitem(FAMILIES, arch, dataclasses.replace(family, group=family.reference))
    slow = train_steps(new_state(SRC, cfg), SRC, progress=False)
    for a, b in zip(fast.groups, slow.groups, strict=True):
        assert type(a) is GROUPS[arch][0] and a.fast and type(b) is GROUPS[arch][1]
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sb:  # parameters, dead counters and the threshold
            assert_close(sa[name], sb[name], atol=1e-4, rtol=1e-3, msg=name)
        assert (sa["threshold"] > 0).all()
