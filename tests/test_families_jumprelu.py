"""The jumprelu family: its stacked group against a plain one-dictionary reference, its threshold
learning, and its saved dictionary.

The reference below is written from the paper's definitions with its own straight-through
construction (detached surrogates, no autograd.Function), so it shares no code with the module.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import unsuperpose.train.families.jumprelu_fast as jumprelu_fast
from unsuperpose.train import load_dictionary
from unsuperpose.train.config import JumpReLUOptions, SAETrainConfig
from unsuperpose.train.families.jumprelu import JumpReLUGroup, JumpReLUSAE
from unsuperpose.train.families.jumprelu_fast import JumpReLUFastGroup
from unsuperpose.train.registry import get_family


def sparse_data(rows: int, d: int, G: int, p: float, seed: int) -> torch.Tensor:
    """Rows of random unit features, each on with probability p, coefficients U(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(G, d, generator=gen)
    feats /= feats.norm(dim=1, keepdim=True)
    on = torch.rand(rows, G, generator=gen) < p
    return (on * torch.rand(rows, G, generator=gen)) @ feats


def config(values, n, **changes) -> SAETrainConfig:
    return SAETrainConfig(arch="jumprelu", sparsity=values, dict_sizes=[n], **changes)


def reference_params(g: JumpReLUGroup, s: int) -> dict[str, torch.Tensor]:
    """Dictionary s's raw trained tensors, as fresh leaves of one plain SAE."""
    n = g.n
    cols = slice(s * n, (s + 1) * n)
    p = {
        "W_enc": g.W_enc[:, cols],
        "b_enc": g.b_enc[cols],
        "W_dec": g.W_dec[s],
        "b_dec": g.b_dec[s],
        "log_threshold": g.extra["log_threshold"][cols],
    }
    return {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}


def reference_loss(p: dict, x: torch.Tensor, coef: float, eps: float):
    """The paper's loss for one dictionary, straight-through by detached surrogates:
    v + (a * theta - (a * theta).detach()) has v's value and gradient a with respect to theta."""
    W_dec = p["W_dec"] / p["W_dec"].norm(dim=1, keepdim=True)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    theta = torch.exp(p["log_threshold"])
    on = (pre > theta).float()
    window = (((pre - theta) / eps).abs() < 0.5).float()
    slope_code = (-(theta / eps) * window).detach()  # d code / d theta
    slope_step = (-(1 / eps) * window).detach()  # d H / d theta
    codes = pre * on + (slope_code * theta - (slope_code * theta).detach())
    step = on + (slope_step * theta - (slope_step * theta).detach())
    x_hat = codes @ W_dec + p["b_dec"]
    recon = (x - x_hat).pow(2).sum(dim=1).mean()
    l0 = step.sum(dim=1).mean()
    return recon + coef * l0, codes.detach(), x_hat.detach()


def group_params(g: JumpReLUGroup, s: int) -> dict[str, torch.Tensor]:
    n = g.n
    cols = slice(s * n, (s + 1) * n)
    return {
        "W_enc": g.W_enc[:, cols],
        "b_enc": g.b_enc[cols],
        "W_dec": g.W_dec[s],
        "b_dec": g.b_dec[s],
        "log_threshold": g.extra["log_threshold"][cols],
    }


def group_grads(g: JumpReLUGroup, s: int) -> dict[str, torch.Tensor]:
    n = g.n
    cols = slice(s * n, (s + 1) * n)
    return {
        "W_enc": g.W_enc.grad[:, cols],
        "b_enc": g.b_enc.grad[cols],
        "W_dec": g.W_dec.grad[s],
        "b_dec": g.b_dec.grad[s],
        "log_threshold": g.extra["log_threshold"].grad[cols],
    }


# The defaults (eps = theta_0 = 1e-3) and a wide kernel, where many pre-activations fall in the
# threshold's window so its straight-through gradient is exercised on most latents.
OPTIONS = [JumpReLUOptions(), JumpReLUOptions(bandwidth=0.15, init_threshold=0.1)]


@pytest.mark.parametrize("cls", [JumpReLUGroup, JumpReLUFastGroup], ids=["autograd", "fast"])
@pytest.mark.parametrize("opts", OPTIONS, ids=["paper-defaults", "wide-kernel"])
def test_step_matches_plain_reference(opts, cls, monkeypatch):
    d, n, values = 12, 20, [0.0, 3e-3, 0.05]
    cfg = config(values, n, jumprelu=opts)
    # The fast path's sparse step however many codes fire (these fire many).
    monkeypatch.setattr(jumprelu_fast, "DENSE_ABOVE", 1.0)
    g = cls(d, n, values, cfg, seed=0)
    with torch.no_grad():  # a nonzero decoder bias and varied thresholds, so every term counts
        g.b_dec.copy_(0.05 * torch.randn(g.S, d, generator=torch.Generator().manual_seed(1)))
        g.extra["log_threshold"].add_(
            0.3 * torch.randn(g.S * n, generator=torch.Generator().manual_seed(2))
        )
    x = sparse_data(128, d, 24, 0.15, seed=3)
    refs = [reference_params(g, s) for s in range(g.S)]

    # forward: the group's inference path and the reference's codes and reconstructions
    codes, x_hat = g.reconstruct(x)
    for s, p in enumerate(refs):
        loss, ref_codes, ref_x_hat = reference_loss(p, x, values[s], opts.bandwidth)
        torch.testing.assert_close(codes[:, s], ref_codes, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(x_hat[s], ref_x_hat, atol=1e-6, rtol=1e-5)

    # loss and gradients
    opt = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    red = g.forward_backward(x)
    assert getattr(g, "dense_steps", 0) == 0
    ref_opts = []
    for s, p in enumerate(refs):
        loss, _, _ = reference_loss(p, x, values[s], opts.bandwidth)
        loss.backward()
        grads = group_grads(g, s)
        for name, t in p.items():
            torch.testing.assert_close(grads[name], t.grad, atol=2e-6, rtol=1e-4, msg=name)
        ref_opts.append(torch.optim.Adam(list(p.values()), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)))
    # the threshold learns: from the reconstruction (l0_coef 0) and from the L0 term
    assert g.extra["log_threshold"].grad[:n].abs().sum() > 0
    if opts.bandwidth > 0.1:
        assert (g.extra["log_threshold"].grad[:n] != 0).float().mean() > 0.5
    # the training forward's statistics: squared error, sum of codes, active codes
    sq = torch.stack([(x - x_hat[s]).pow(2).sum() for s in range(g.S)]).double()
    torch.testing.assert_close(g.stats[0], sq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.stats[1], codes.sum(dim=(0, 2)).double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.stats[2], (codes > 0).sum(dim=(0, 2)).double())

    # one Adam step, then the decoder rows back to unit norm
    g.finish_step(red, 1)
    opt.step()
    g.post_step()
    for s, (p, ref_opt) in enumerate(zip(refs, ref_opts)):
        ref_opt.step()
        with torch.no_grad():
            p["W_dec"].div_(p["W_dec"].norm(dim=1, keepdim=True))
        mine = group_params(g, s)
        for name, t in p.items():
            torch.testing.assert_close(mine[name], t.detach(), atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(g.W_dec.norm(dim=-1), torch.ones(g.S, n))


def test_l0_term_gradient_on_the_threshold_is_the_kernel_count():
    """Dictionaries of one size start equal, so their threshold gradients differ by exactly the
    L0 term's: d/d log theta of lambda * mean_B sum_i H = -lambda * theta / eps * (rows in the
    window) / B."""
    d, n, lam = 12, 20, 0.02
    opts = JumpReLUOptions(bandwidth=0.15, init_threshold=0.1)
    g = JumpReLUGroup(d, n, [0.0, lam], config([0.0, lam], n, jumprelu=opts), seed=0)
    x = sparse_data(256, d, 24, 0.15, seed=4)
    g.forward_backward(x)
    grad = g.extra["log_threshold"].grad.view(2, n)
    with torch.no_grad():
        pre = g.pre_activations(x, g.dictionaries())[:, 0]  # (B, n), equal for both
    theta = opts.init_threshold
    in_window = ((pre - theta).abs() < opts.bandwidth / 2).float().mean(0)
    assert in_window.sum() > 0
    expected = -lam * theta / opts.bandwidth * in_window
    torch.testing.assert_close(grad[1] - grad[0], expected, atol=1e-6, rtol=1e-4)


def train(g: JumpReLUGroup, x: torch.Tensor, steps: int, batch: int) -> None:
    cfg = g.config
    opt = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    gen = torch.Generator().manual_seed(5)
    for step in range(1, steps + 1):
        rows = torch.randint(len(x), (batch,), generator=gen)
        red = g.forward_backward(x[rows])
        g.finish_step(red, step)
        opt.step()
        g.post_step()


def test_larger_l0_coef_raises_thresholds_and_lowers_l0():
    d, n = 16, 32
    values = [0.0, 0.01, 0.05]
    opts = JumpReLUOptions(bandwidth=0.05, init_threshold=0.05)
    g = JumpReLUGroup(d, n, values, config(values, n, jumprelu=opts, lr=1e-2), seed=0)
    x = sparse_data(4096, d, 32, 0.1, seed=6)
    held_out = sparse_data(2048, d, 32, 0.1, seed=7)
    train(g, x, steps=200, batch=128)
    with torch.no_grad():
        theta = g.threshold().mean(dim=1)  # (S,)
        codes, x_hat = g.reconstruct(held_out)
        l0 = (codes > 0).float().sum(-1).mean(0)  # (S,)
        mse = (held_out - x_hat).pow(2).sum(-1).mean(-1)
    # both terms move theta: the reconstruction alone lowers it, the L0 term raises it
    assert theta[0] < opts.init_threshold < theta[1] < theta[2], theta
    assert l0[0] > l0[1] > l0[2], l0
    assert mse[2] > mse[0], mse  # the sparser dictionary pays in reconstruction
    assert torch.isfinite(g.W_dec).all() and not g.nonfinite().any()


def test_saved_dictionary_matches_reconstruct(tmp_path):
    d, n, values = 12, 20, [1e-3, 0.02]
    opts = JumpReLUOptions(bandwidth=0.05, init_threshold=0.05)
    g = JumpReLUGroup(d, n, values, config(values, n, jumprelu=opts, lr=1e-2), seed=0)
    x = sparse_data(1024, d, 24, 0.15, seed=8)
    train(g, x, steps=30, batch=64)
    assert g.b_dec.abs().sum() > 0 and g.threshold().std() > 0  # trained, not the init
    codes, x_hat = g.reconstruct(x[:256])
    for s in range(g.S):
        path = g.dictionary(s).save(tmp_path / f"s{s}", {"l0_coef": values[s]})
        sae = load_dictionary(path)
        assert isinstance(sae, JumpReLUSAE)
        assert sae.config["arch"] == "jumprelu" and sae.config["l0_coef"] == values[s]
        torch.testing.assert_close(sae.threshold, g.threshold().detach()[s])
        with torch.no_grad():
            mine = sae.encode(x[:256])
            torch.testing.assert_close(mine, codes[:, s], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(sae.decode(mine), x_hat[s], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(sae.atoms(), g.dictionaries()[s])


def test_family_registration():
    fam = get_family("jumprelu")
    # trained through its sparse fast path (tests/test_jumprelu_fast.py)
    assert fam.group is JumpReLUFastGroup and fam.reference is JumpReLUGroup
    assert fam.dictionary is JumpReLUSAE and not fam.knob.denser_when_larger
    assert (fam.knob.name, fam.knob.field, fam.knob.flag) == ("l0_coef", "l0_coef", "--l0-coef")
    cfg = config([1e-3, 2e-3], 8)
    assert cfg.sparsity == [1e-3, 2e-3]
    with pytest.raises(ValueError, match="init_threshold"):
        bad = dataclasses.replace(cfg, jumprelu=JumpReLUOptions(init_threshold=0.0))
        JumpReLUGroup(4, 8, [1e-3], bad)
