"""The jumprelu family's CPU steps (sparse, and dense where many codes fire) are a fast path of
its autograd group: step by step the same gradients (the thresholds' straight-through ones
included), parameters, Adam moments, dead counters, statistics and firing counts; and through
the trainer the same trained grid, resumed bit-identically."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import unsuperpose.train.families.jumprelu_fast as jumprelu_fast
from fast_paths import SRC, assert_off_the_cpu_it_is_autograd, perturb, record_steps
from unsuperpose.train import FAMILIES, SAETrainConfig, get_family, new_state, train_steps
from unsuperpose.train.checkpoint import Checkpointer, load_checkpoint
from unsuperpose.train.config import JumpReLUOptions
from unsuperpose.train.families.jumprelu import JumpReLUGroup
from unsuperpose.train.families.jumprelu_fast import JumpReLUFastGroup

N, B, STEPS = 24, 32, 30
TOL = dict(atol=2e-5, rtol=1e-4)
# pre-activations here have a spread of ~0.2: thresholds at each latent's 85th percentile fire
# ~15% of the codes; bandwidths 0.02 and 0.1 put a few or many entries in the kernel's window.
KNOBS = {"l0 0,0.01,0.3": [0.0, 0.01, 0.3], "l0 0.05": [0.05]}
BANDWIDTHS = {"narrow window": 0.02, "wide window": 0.1}


def make(cls, values, eps, quantile=0.85):
    cfg = SAETrainConfig(arch="jumprelu", sparsity=values, dict_sizes=[N], batch_size=B, lr=3e-3)
    cfg.jumprelu = JumpReLUOptions(bandwidth=eps, init_threshold=0.1)
    g = cls(SRC.d, N, values, cfg, seed=0)
    perturb(g)
    with torch.no_grad():
        pre = g.pre_activations(next(SRC.batches(4 * B, seed=1)), g.dictionaries())
        theta = pre.quantile(quantile, dim=0).clamp(min=1e-3)  # (S, n), every latent its own
        g.extra["log_threshold"].copy_(theta.log().view(-1))
    return g


def run(g, steps=STEPS):
    return record_steps(g, B, steps)


def assert_same_training(fast, slow):
    assert fast.fast and type(slow) is JumpReLUGroup
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
    assert torch.equal(fast.since_fired, slow.since_fired)
    assert_close(fast.stats, slow.stats, rtol=1e-5, atol=1e-6)
    assert fast.stat_rows == slow.stat_rows
    return rec_slow


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("eps", list(BANDWIDTHS))
@pytest.mark.parametrize("values", list(KNOBS))
def test_the_fast_step_equals_the_autograd_group(values, eps, path, monkeypatch):
    # The sparse step however many fire, or the dense hand-written one however few.
    monkeypatch.setattr(jumprelu_fast, "DENSE_ABOVE", 1.0 if path == "sparse" else -1.0)
    fast = make(JumpReLUFastGroup, KNOBS[values], BANDWIDTHS[eps])
    rec = assert_same_training(fast, make(JumpReLUGroup, KNOBS[values], BANDWIDTHS[eps]))
    assert fast.dense_steps == (0 if path == "sparse" else STEPS)
    # Every dictionary's thresholds learnt (entries in the window), and the codes were sparse.
    g_theta = torch.stack([r["log_threshold grad"].view(fast.S, N) for r in rec])
    assert (g_theta.abs().sum(dim=(0, 2)) > 0).all()
    fired = torch.stack([r["fired reduction"] for r in rec]).float()
    assert 0 < fired.mean() < 0.4 * B


def test_the_sparse_step_is_taken_below_the_cutoff_and_the_l0_term_counts():
    """At the module's cutoff, thresholds at the 97th percentile train sparse every step; with a
    large L0 coefficient the thresholds' gradient is the penalty's, pushing them up."""
    values = [0.0, 3.0]
    fast = make(JumpReLUFastGroup, values, 0.02, quantile=0.97)
    rec = assert_same_training(fast, make(JumpReLUGroup, values, 0.02, quantile=0.97))
    assert fast.dense_steps == 0
    g_theta = torch.stack([r["log_threshold grad"].view(fast.S, N) for r in rec]).sum(dim=(0, 2))
    assert g_theta[1] < 0 and g_theta[1] < g_theta[0]  # descent raises the penalised thresholds


def test_where_many_codes_fire_the_step_is_dense():
    """Thresholds at the 30th percentile: every step over the cutoff, trained densely."""
    fast = make(JumpReLUFastGroup, [0.01, 0.1], 0.05, quantile=0.3)
    assert_same_training(fast, make(JumpReLUGroup, [0.01, 0.1], 0.05, quantile=0.3))
    assert fast.dense_steps == STEPS


def test_the_family_trains_the_fast_group_and_tests_it_against_autograd():
    family = get_family("jumprelu")
    assert family.group is JumpReLUFastGroup and family.reference is JumpReLUGroup


def test_off_the_cpu_the_group_is_the_autograd_step(monkeypatch):
    g, ref = make(JumpReLUFastGroup, [0.01], 0.05), make(JumpReLUGroup, [0.01], 0.05)
    assert_off_the_cpu_it_is_autograd(g, ref, B, monkeypatch)


def trainer_config() -> SAETrainConfig:
    """Two sizes, two coefficients; thresholds starting where the larger dictionary's steps are
    some sparse, some dense (over the cutoff), so both kinds and the switch are trained."""
    cfg = SAETrainConfig(
        arch="jumprelu",
        sparsity=[1e-3, 1e-2],
        dict_sizes=[24, 48],
        steps=40,
        batch_size=64,
        dead_window=5,
        log_every=10,
    )
    cfg.jumprelu = JumpReLUOptions(bandwidth=0.05, init_threshold=0.3)
    return cfg


def test_the_trainer_trains_the_fast_group_like_the_autograd_one(monkeypatch):
    cfg = trainer_config()
    fast = train_steps(new_state(SRC, cfg), SRC, progress=False)
    assert any(0 < g.dense_steps < cfg.steps for g in fast.groups)
    family = get_family("jumprelu")
    monkeypatch.setitem(FAMILIES, "jumprelu", dataclasses.replace(family, group=family.reference))
    slow = train_steps(new_state(SRC, cfg), SRC, progress=False)
    for a, b in zip(fast.groups, slow.groups, strict=True):
        assert type(a) is JumpReLUFastGroup and a.fast and type(b) is JumpReLUGroup
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sb:
            assert_close(sa[name], sb[name], atol=1e-4, rtol=1e-3, msg=name)


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path):
    """tests/test_architectures.py's resume check, at thresholds where the fast path runs."""
    cfg = trainer_config()
    whole = train_steps(new_state(SRC, cfg), SRC, progress=False)
    assert all(g.dense_steps < cfg.steps for g in whole.groups)
    part = new_state(SRC, cfg)
    ckpt = Checkpointer(tmp_path / "ckpt", every=0)

    def stop_at_23(state):
        ckpt.stop_requested = state.step == 23
        ckpt(state)

    with pytest.raises(KeyboardInterrupt):
        train_steps(part, SRC, on_step=stop_at_23, progress=False)
    resumed = new_state(SRC, cfg)
    load_checkpoint(resumed, tmp_path / "ckpt")
    assert resumed.step == 23
    train_steps(resumed, SRC, progress=False)
    for a, b in zip(whole.groups, resumed.groups, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name
    opt_a, opt_b = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys()
    for pid in opt_a:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[pid][moment], opt_b[pid][moment]), (pid, moment)
