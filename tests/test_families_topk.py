"""The topk, batchtopk and matryoshka families against plain one-dictionary references.

Each reference below is written from the papers' definitions in plain torch on one dictionary's
weights (no stacking, dead latents and k_aux read on the host, AuxK as sparsify writes it); the
stacked group's dictionary s must take the same gradient and the same Adam step.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import unsuperpose.train
from unsuperpose.train import SAETrainConfig, get_family
from unsuperpose.train.config import AuxKOptions, BatchTopKOptions
from unsuperpose.train.families.auxk import auxk_loss
from unsuperpose.train.families.batchtopk import BatchTopKGroup, BatchTopKSAE
from unsuperpose.train.families.batchtopk_fast import BatchTopKFastGroup
from unsuperpose.train.families.matryoshka import MatryoshkaGroup, MatryoshkaSAE, prefix_sizes
from unsuperpose.train.families.matryoshka_fast import MatryoshkaFastGroup
from unsuperpose.train.families.topk import TopKGroup, TopKSAE
from unsuperpose.train.families.topk_fast import TopKFastGroup

GROUPS = {"topk": TopKGroup, "batchtopk": BatchTopKGroup, "matryoshka": MatryoshkaGroup}
FAST = {"topk": TopKFastGroup, "batchtopk": BatchTopKFastGroup, "matryoshka": MatryoshkaFastGroup}
D, N, B = 10, 24, 64
VALUES = [2, 5, 3]


def make_group(arch, values=VALUES, *, n=N, d=D, seed=0, cls=None, **overrides):
    cfg = SAETrainConfig(arch=arch, sparsity=values, dict_sizes=[n], batch_size=B, **overrides)
    return (cls or GROUPS[arch])(d, n, values, cfg, seed=seed)


def adam(params, cfg):
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def train_step(g, opt, x, step):
    red = g.forward_backward(x)
    g.finish_step(red, step)
    opt.step()
    g.post_step()
    return red


def perturb(g, gen):
    """Every dictionary different, a nonzero b_dec and decoder rows off unit norm, so the
    comparison sees the decoder bias and the normalisation's gradient."""
    with torch.no_grad():
        g.W_enc.add_(0.1 * torch.randn(g.W_enc.shape, generator=gen))
        g.b_enc.add_(0.05 * torch.randn(g.b_enc.shape, generator=gen))
        g.W_dec.add_(0.1 * torch.randn(g.W_dec.shape, generator=gen))
        g.W_dec.mul_(1 + 0.2 * torch.rand(g.S, g.n, 1, generator=gen))
        g.b_dec.add_(0.1 * torch.randn(g.b_dec.shape, generator=gen))


def slice_of(g, s, grad=False):
    get = (lambda t: t.grad) if grad else (lambda t: t.detach())
    return {
        "W_enc": get(g.W_enc).view(g.d, g.S, g.n)[:, s].clone(),
        "b_enc": get(g.b_enc).view(g.S, g.n)[s].clone(),
        "W_dec": get(g.W_dec)[s].clone(),
        "b_dec": get(g.b_dec)[s].clone(),
    }


# -- the plain references --------------------------------------------------------------------------
def ref_codes(arch, pre, k):
    act = torch.relu(pre)
    if arch == "topk":
        vals, idx = act.topk(k, dim=-1)
        return torch.zeros_like(act).scatter(-1, idx, vals)
    flat = act.flatten()  # BatchTopK: the B*k largest of the whole batch
    vals, idx = flat.topk(k * len(pre))
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(act)


def ref_loss(arch, p, x, k, cfg, dead):
    """One dictionary's loss; ``dead`` (n,) bool, the latents AuxK may use."""
    dn = p["W_dec"] / p["W_dec"].norm(dim=1, keepdim=True)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    codes = ref_codes(arch, pre, k)
    x_hat = codes @ dn + p["b_dec"]
    if arch == "matryoshka":
        n = dn.shape[0]
        sizes = sorted({max(1, round(f * n)) for f in cfg.matryoshka.prefixes})
        loss = sum((x - (codes[:, :m] @ dn[:m] + p["b_dec"])).pow(2).sum(1).mean() for m in sizes)
    else:
        loss = (x - x_hat).pow(2).sum(1).mean()
    n_dead = int(dead.sum())
    if n_dead > 0 and cfg.auxk.coef > 0:  # sparsify's AuxK, OpenAI's normalisation
        k_aux = cfg.auxk.k_aux or x.shape[1] // 2
        scale = min(n_dead / k_aux, 1.0)
        aux_pre = torch.where(dead[None], torch.relu(pre), -torch.inf)
        vals, idx = aux_pre.topk(min(k_aux, n_dead), dim=-1)
        e_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ dn
        e = (x - x_hat).detach()
        loss = loss + cfg.auxk.coef * scale * (e_hat - e).pow(2).sum() / (
            (e - e.mean(0)).pow(2).sum()
        )
    return loss, codes


def ref_step(arch, p0, x, k, cfg, dead):
    p = {name: t.clone().requires_grad_(True) for name, t in p0.items()}
    opt = adam(list(p.values()), cfg)
    loss, _ = ref_loss(arch, p, x, k, cfg, dead)
    loss.backward()
    grads = {name: t.grad.clone() for name, t in p.items()}
    opt.step()
    with torch.no_grad():
        p["W_dec"].div_(p["W_dec"].norm(dim=1, keepdim=True))
    return grads, {name: t.detach() for name, t in p.items()}


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("trained", ["autograd group", "the family's group (fast path)"])
@pytest.mark.parametrize("arch", sorted(GROUPS))
@pytest.mark.parametrize("with_dead", [False, True])
def test_one_step_matches_plain_reference(arch, with_dead, trained):
    gen = torch.Generator().manual_seed(1)
    g = make_group(arch, cls=None if trained == "autograd group" else get_family(arch).group)
    perturb(g, gen)
    if with_dead:  # three latents silent for the window (fewer than k_aux = 5: AuxK scaled)
        g.since_fired[:, [0, 3, 7]] = g.config.dead_window
        g.since_fired[:, [1, 4]] = g.config.dead_window - 1  # one step short: alive
    x = torch.randn(B, D, generator=gen)
    before = [slice_of(g, s) for s in range(g.S)]
    dead = g.since_fired >= g.config.dead_window
    opt = adam(g.parameters(), g.config)
    red = g.forward_backward(x)
    grads = [slice_of(g, s, grad=True) for s in range(g.S)]
    g.finish_step(red, 1)
    opt.step()
    g.post_step()
    for s, k in enumerate(VALUES):
        want_grads, want = ref_step(arch, before[s], x, k, g.config, dead[s])
        for name in want:
            assert_close(grads[s][name], want_grads[name], msg=f"{arch} s={s} grad {name}")
            assert_close(slice_of(g, s)[name], want[name], msg=f"{arch} s={s} {name}")


@pytest.mark.parametrize("arch", sorted(GROUPS))
def test_auxk_changes_the_gradient_only_with_dead_latents(arch):
    """The comparison above with the AuxK term's own gradient: zero with nothing dead, and
    exactly on the dead latents (never a live one's encoder) when some are."""
    gen = torch.Generator().manual_seed(2)
    g = make_group(arch)
    perturb(g, gen)
    x = torch.randn(B, D, generator=gen)
    g.W_enc.requires_grad_(True)  # the group's parameters require grad only inside a step
    g.W_dec.requires_grad_(True)
    with torch.enable_grad():
        dn = g.W_dec / g.W_dec.norm(dim=-1, keepdim=True)
        pre = g.pre_activations(x, dn)
        err = g.decode(g.codes(pre, training=True), dn) - x
        assert_close(auxk_loss(g, pre, err, dn), torch.zeros(g.S))
        g.since_fired[:, :4] = g.config.dead_window
        loss = auxk_loss(g, pre, err, dn)
        assert (loss > 0).all()
        (w_enc,) = torch.autograd.grad(loss.sum(), [g.W_enc])
    w_enc = w_enc.view(D, g.S, g.n)
    assert (w_enc[:, :, :4].abs().sum(0) > 0).all()  # every dead latent of every dictionary
    assert (w_enc[:, :, 4:] == 0).all()
    # coef 0 turns it off, dead latents or not.
    off = make_group(arch, auxk=AuxKOptions(coef=0.0))
    off.since_fired[:, :4] = off.config.dead_window
    assert_close(auxk_loss(off, pre, err, dn), torch.zeros(g.S))


def test_topk_codes_have_at_most_k_per_row():
    gen = torch.Generator().manual_seed(3)
    g = make_group("topk")
    perturb(g, gen)
    x = torch.randn(B, D, generator=gen)
    for training in (True, False):
        codes = g.codes(g.pre_activations(x, g.dictionaries()), training=training)
        l0 = (codes > 0).sum(-1)  # (B, S)
        positives = (g.pre_activations(x, g.dictionaries()) > 0).sum(-1)
        assert (codes >= 0).all()
        assert_close(l0, torch.minimum(positives, torch.tensor(VALUES)))


def test_batchtopk_training_codes_keep_b_times_k_per_dictionary():
    gen = torch.Generator().manual_seed(4)
    g = make_group("batchtopk")
    perturb(g, gen)
    x = torch.randn(B, D, generator=gen)
    codes = g.codes(g.pre_activations(x, g.dictionaries()), training=True)
    assert (codes > 0).sum(dim=(0, 2)).tolist() == [B * k for k in VALUES]
    assert ((codes > 0).sum(-1) != torch.tensor(VALUES)).any()  # rows differ from k


def _saved_matches_reconstruct(g, tmp_path, x):
    codes, x_hat = g.reconstruct(x)
    for s in range(g.S):
        folder = g.dictionary(s).save(tmp_path / f"{g.arch}-{s}")
        sae = unsuperpose.train.load_dictionary(folder)
        assert type(sae) is get_family(g.arch).dictionary
        assert sae.config["k"] == VALUES[s]
        with torch.no_grad():
            mine = sae.encode(x)
            assert_close(mine, codes[:, s])
            assert_close(sae.decode(mine), x_hat[s])
    return sae


@pytest.mark.parametrize("arch", sorted(GROUPS))
def test_saved_dictionary_encodes_like_the_group(arch, tmp_path):
    gen = torch.Generator().manual_seed(5)
    g = make_group(arch, steps=10, batchtopk=BatchTopKOptions(threshold_from=0.5))
    opt = adam(g.parameters(), g.config)
    x_eval = torch.randn(4 * B, D, generator=gen)
    for step in range(1, 11):
        train_step(g, opt, torch.randn(B, D, generator=gen), step)
        if step in (3, 10):  # before the threshold exists (per-row top k) and after
            sae = _saved_matches_reconstruct(g, tmp_path / str(step), x_eval)
    if arch != "topk":
        assert (g.buffers["threshold"] > 0).all()
        assert_close(sae.threshold, g.buffers["threshold"][-1].expand(N))
    if arch == "matryoshka":
        assert sae.config["prefix_sizes"] == [2, 3, 6, 12, 24]


def test_classes():
    assert issubclass(MatryoshkaSAE, BatchTopKSAE)
    for arch, cls in [
        ("topk", TopKSAE),
        ("batchtopk", BatchTopKSAE),
        ("matryoshka", MatryoshkaSAE),
    ]:
        fam = get_family(arch)
        assert fam.dictionary is cls and fam.reference is GROUPS[arch]
        # each trains through its sparse fast path, a subclass of the autograd group
        # (tests/test_topk_fast.py; tests/test_batchtopk_fast.py for batchtopk and matryoshka)
        assert fam.group is FAST.get(arch, GROUPS[arch])
        assert issubclass(fam.group, GROUPS[arch])
        assert (fam.knob.name, fam.knob.field, fam.knob.flag) == ("k", "top_k", "--topk")
        assert fam.knob.denser_when_larger
    assert prefix_sizes([0.0625, 0.125, 0.25, 0.5, 1.0], 8) == [1, 2, 4, 8]
    assert prefix_sizes([0.0625, 0.125, 0.25, 0.5, 1.0], 4096) == [256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_threshold_waits_then_averages_the_smallest_kept_code(arch):
    gen = torch.Generator().manual_seed(6)
    m = 0.9
    g = make_group(
        arch, steps=10, batchtopk=BatchTopKOptions(threshold_from=0.5, threshold_momentum=m)
    )
    opt = adam(g.parameters(), g.config)
    previous = None
    for step in range(1, 9):
        x = torch.randn(B, D, generator=gen)
        with torch.no_grad():
            codes = g.codes(g.pre_activations(x, g.dictionaries()), training=True)
        smallest = torch.stack([c[c > 0].min() for c in codes.transpose(0, 1)])
        train_step(g, opt, x, step)
        thr = g.buffers["threshold"]
        if step <= 5:
            assert (thr == -1).all()
        elif step == 6:
            assert_close(thr, smallest)
        else:
            assert_close(thr, m * previous + (1 - m) * smallest)
        previous = thr.clone()
    assert "threshold" in g.state_dict()


def _sparse_data(gen, rows, d=32, features=48, p=0.06):
    directions = torch.randn(features, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)

    def batch():
        on = torch.rand(rows, features, generator=gen) < p
        return (on * torch.rand(rows, features, generator=gen)) @ directions

    return batch


@pytest.mark.slow
def test_trained_batchtopk_inference_l0_is_close_to_k():
    """The threshold's average must follow the codes' scale, which falls all through a short
    run: momentum 0.9 over the last half here. (With the default 0.999, i.e. a memory of ~1000
    steps, a 300-step run keeps mostly its first estimate and encodes ~2.8 latents a row.)"""
    gen = torch.Generator().manual_seed(7)
    k, steps = 4, 300
    batch = _sparse_data(gen, 256)
    opts = BatchTopKOptions(threshold_momentum=0.9, threshold_from=0.5)
    cfg = SAETrainConfig(
        arch="batchtopk", sparsity=[k], dict_sizes=[64], batch_size=256, steps=steps, batchtopk=opts
    )
    g = BatchTopKGroup(32, 64, [k], cfg, seed=0)
    opt = adam(g.parameters(), cfg)
    for step in range(1, steps + 1):
        train_step(g, opt, batch(), step)
    assert g.buffers["threshold"].item() > 0
    codes, _ = g.reconstruct(torch.cat([batch() for _ in range(8)]))
    l0 = (codes > 0).sum(-1).float().mean().item()
    assert abs(l0 - k) <= 0.1 * k, l0
