"""What the fast-path tests share: small toy data, a group nudged off its symmetric start, the
steps that record every gradient, the off-CPU check that the group falls back to autograd, and
AuxK's regimes (dead latents at most k_aux or more; dense block or sparse entries)."""

from __future__ import annotations

import torch

from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train.config import AuxKOptions
from unsuperpose.train.families import sparse_step

SRC = ToySource(ToyConfig(h=16, G=32, k=3, decay=0.95, seed=0))
SILENT = [0, 3, 7, 11, 19]  # latents planted dead in every dictionary


@torch.no_grad()
def perturb(g, plant: bool = False) -> None:
    """Every dictionary different, b_dec nonzero, decoder rows off norm; ``plant``: the SILENT
    latents weak (below the top k, so dead, but with ReLU(pre) > 0 for AuxK to use)."""
    gen = torch.Generator().manual_seed(1)
    g.W_enc.add_(0.1 * torch.randn(g.W_enc.shape, generator=gen))
    g.b_enc.add_(0.05 * torch.randn(g.b_enc.shape, generator=gen))
    g.W_dec.mul_(1 + 0.2 * torch.rand(g.S, g.n, 1, generator=gen))
    g.b_dec.add_(0.1 * torch.randn(g.b_dec.shape, generator=gen))
    if plant:
        g.W_enc.view(-1, g.S, g.n)[:, :, SILENT] *= 0.1
        g.b_enc.view(g.S, g.n)[:, SILENT] = -0.02


def record_steps(g, batch_size: int, steps: int):
    """``steps`` trainer steps on SRC; every step's gradients and reductions, and the optimiser."""
    opt = torch.optim.Adam(g.parameters(), lr=g.config.lr, fused=True)
    it = SRC.batches(batch_size, seed=0)
    record = []
    for step in range(1, steps + 1):
        red = g.forward_backward(next(it))
        record.append(
            {
                **{f"{k} grad": t.grad.clone() for k, t in g.named_parameters().items()},
                **{f"{k} reduction": t.clone() for k, (t, _) in red.items()},
            }
        )
        g.finish_step(red, step)
        opt.step()
        g.post_step()
    return record, opt


def assert_off_the_cpu_it_is_autograd(g, ref, batch_size: int, monkeypatch) -> None:
    """A group told it is not on the CPU (what a CUDA group is) takes its reference's step."""
    g.fast = False
    x = next(SRC.batches(batch_size, seed=0))
    monkeypatch.setattr(torch.sparse, "sampled_addmm", None)  # the sparse path is not taken
    g.forward_backward(x)
    ref.forward_backward(x)
    for name, t in ref.named_parameters().items():
        assert torch.equal(g.named_parameters()[name].grad, t.grad)


# AuxK's ways through the sparse steps, each with its options and ``DENSE_AUXK``: k_aux above
# every dead count (the block's ReLU, no top-k); k_aux below most dead counts (each row's top
# k_aux of the block); the same as sparse entries (``DENSE_AUXK`` 0: never a dense block).
AUXK_REGIMES = {
    "dead <= k_aux, dense": (dict(auxk=AuxKOptions(coef=0.5, k_aux=40)), 8),
    "dead > k_aux, dense": (dict(auxk=AuxKOptions(coef=1.0, k_aux=2)), 8),
    "dead > k_aux, sparse": (dict(auxk=AuxKOptions(coef=1.0, k_aux=2)), 0),
}


def watch_auxk(monkeypatch, regime: str) -> list[tuple[str, int, int]]:
    """Set ``regime``'s ``DENSE_AUXK``; every AuxK block the steps compute is then recorded as
    (way, dead latents, codes per row)."""
    seen = []
    monkeypatch.setattr(sparse_step, "DENSE_AUXK", AUXK_REGIMES[regime][1])
    for way in ("dense_auxk", "sparse_auxk"):
        f = getattr(sparse_step, way)

        def watched(cand, ka, *rest, f=f, way=way):
            seen.append((way, cand.shape[1], ka))
            return f(cand, ka, *rest)

        monkeypatch.setattr(sparse_step, way, watched)
    return seen


def assert_auxk_regime(seen: list[tuple[str, int, int]], regime: str) -> None:
    """Every AuxK block went the regime's way; with k_aux above every dead count each row kept
    the whole block, else at least 10 blocks had more dead latents than k_aux."""
    way = "sparse_auxk" if regime.endswith("sparse") else "dense_auxk"
    assert {w for w, _, _ in seen} == {way}, seen
    if regime.startswith("dead <= k_aux"):
        assert len(seen) >= 10 and all(ka == m for _, m, ka in seen), seen
    else:
        assert sum(ka < m for _, m, ka in seen) >= 10, seen
