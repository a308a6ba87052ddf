"""The topk family's sparse CPU step is a fast path of its autograd group: same gradients, same
parameters after Adam, same dead counters, statistics and firing counts, AuxK included."""

from __future__ import annotations

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
from unsuperpose.train import SAETrainConfig, get_family
from unsuperpose.train.config import AuxKOptions
from unsuperpose.train.families.topk import TopKGroup
from unsuperpose.train.families.topk_fast import TopKFastGroup

N, B, VALUES = 24, 32, [2, 5, 3]


def make(cls, values=VALUES, plant=False, **options):
    cfg = SAETrainConfig(
        arch="topk", sparsity=values, dict_sizes=[N], batch_size=B, lr=3e-3, **options
    )
    g = cls(SRC.d, N, values, cfg, seed=0)
    perturb(g, plant)
    return g


def run(g, steps=30, check=None):
    opt = torch.optim.Adam(g.parameters(), lr=g.config.lr, fused=True)
    it = SRC.batches(B, seed=0)
    fired = []
    for step in range(1, steps + 1):
        red = g.forward_backward(next(it))
        fired.append(red["fired"][0].clone())
        if check:
            check(step, g)
        g.finish_step(red, step)
        opt.step()
        g.post_step()
    return g, torch.stack(fired)


CASES = {
    "no AuxK": dict(auxk=AuxKOptions(coef=0.0)),
    "AuxK on, no latent silent for 1000 steps": dict(),
    "planted dead, k_aux 5": dict(dead_window=1, auxk=AuxKOptions(coef=0.5), plant=True),
    "planted dead, k_aux 2": dict(dead_window=2, auxk=AuxKOptions(coef=1.0, k_aux=2), plant=True),
    "dead by a short window": dict(dead_window=1, auxk=AuxKOptions(coef=0.3, k_aux=40)),
}


@pytest.mark.parametrize("values", [VALUES, [4]], ids=["k 2,5,3", "k 4"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_sparse_step_equals_the_autograd_group(case, values):
    options = dict(CASES[case])
    plant = options.pop("plant", False)
    grads = []

    def keep_grads(step, g):
        grads.append({k: t.grad.clone() for k, t in g.named_parameters().items()})

    fast, fired_fast = run(make(TopKFastGroup, values, plant, **options), check=keep_grads)
    fast_grads, grads = grads, []
    slow, fired_slow = run(make(TopKGroup, values, plant, **options), check=keep_grads)
    assert fast.fast
    for step, (a, b) in enumerate(zip(fast_grads, grads), 1):
        for name in b:
            where = f"{name} grad, step {step}"
            assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=lambda m, w=where: f"{w}: {m}")
    for name, t in slow.named_parameters().items():
        assert_close(
            fast.named_parameters()[name],
            t,
            atol=2e-5,
            rtol=1e-4,
            msg=lambda m, w=name: f"{w}: {m}",
        )
    assert torch.equal(fired_fast, fired_slow)
    assert torch.equal(fast.since_fired, slow.since_fired)
    assert_close(fast.stats, slow.stats, rtol=1e-5, atol=1e-6)
    assert fast.stat_rows == slow.stat_rows
    # A latent that did not fire gets a gradient from AuxK only: it did where latents were dead.
    silent_grad = [
        (grad["W_enc"].view(-1, slow.S, N).abs().sum(0) * (fired == 0)).sum()
        for grad, fired in zip(grads, fired_slow)
    ]
    assert (sum(silent_grad) > 0) == ("dead" in case)


@pytest.mark.parametrize("regime", list(AUXK_REGIMES))
def test_auxk_on_the_dead_block_equals_the_autograd_group(regime, monkeypatch):
    """Planted dead latents, AuxK's gradient large (coefficient 0.5-1): step by step the same
    gradients and, after Adam, parameters and moments, whichever way AuxK went."""
    seen = watch_auxk(monkeypatch, regime)
    options = dict(AUXK_REGIMES[regime][0], dead_window=2)
    fast, slow = make(TopKFastGroup, plant=True, **options), make(TopKGroup, plant=True, **options)
    rec_fast, opt_fast = record_steps(fast, B, 20)
    rec_slow, opt_slow = record_steps(slow, B, 20)
    assert_auxk_regime(seen, regime)
    for step, (a, b) in enumerate(zip(rec_fast, rec_slow, strict=True), 1):
        for name in b:
            where = f"{name}, step {step}"
            assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=lambda m, w=where: f"{w}: {m}")
    for name, t in slow.named_parameters().items():
        mine = fast.named_parameters()[name]
        assert_close(mine, t, atol=2e-5, rtol=1e-4, msg=name)
        for moment in ("exp_avg", "exp_avg_sq"):
            got, want = opt_fast.state[mine][moment], opt_slow.state[t][moment]
            assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{name} {moment}")
    assert torch.equal(fast.since_fired, slow.since_fired)


def test_the_family_trains_the_fast_group_and_tests_it_against_autograd():
    family = get_family("topk")
    assert family.group is TopKFastGroup and family.reference is TopKGroup


def test_off_the_cpu_the_group_is_the_autograd_step(monkeypatch):
    assert_off_the_cpu_it_is_autograd(make(TopKFastGroup), make(TopKGroup), B, monkeypatch)
