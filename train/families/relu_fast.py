"""The ``relu`` family's fast path: the ReLU + L1 step with a hand-written backward.

The layout is ``StackedGroup``'s (no decoder bias); only ``forward_backward`` differs from the
autograd ``ReluGroup`` it subclasses. The decoder products are batched GEMMs over S. The
gradients are derived by hand (checked against ``ReluGroup`` in the tests): autograd would keep
more intermediates alive and add per-op overhead that dominates at toy sizes.

Loss of SAE s:  mean((x_hat - x)^2) + alpha_s / m * mean_b sum_i c_i     (c >= 0 after ReLU)
  g      = dL/dx_hat = 2 (x_hat - x) / (B d)
  dDn    = c^T g                        (decoder atoms, before the normalisation's Jacobian)
  dc     = g Dn^T + alpha_s / (m B)
  dpre   = dc * [pre > 0]
  dW_enc = x^T dpre,  db_enc = sum_b dpre
  dW_dec = (dDn - Dn * <dDn, Dn>_row) / ||W_dec||_row           (through Dn = W_dec / ||W_dec||)
  tied:  the encoder is Dn^T, so dDn also receives dW_enc^T.

Devices: everything a step touches (parameters, work buffers, statistics, dead counters) lives on
the group's device, and a step never waits for the host: the statistics stay tensors until a log
step reads them. The initial weights are drawn on the CPU with the seeded generator and then
moved, so a GPU run starts from exactly the CPU run's weights. The sparse CSR path exists for the
CPU only (torch's CUDA CSR kernels were not measured faster than cuBLAS here; and deciding per
step needs the active count on the host, a sync); on a GPU every step is dense.

"""

from __future__ import annotations

import torch

from unsuperpose.train import sparse
from unsuperpose.train.codes import firing_counts
from unsuperpose.train.families.relu import ReluGroup
from unsuperpose.train.families.stacked import Reductions
from unsuperpose.train.registry import register_fast_path


class ReluFastGroup(ReluGroup):
    """``ReluGroup`` with the hand-written step; the sparse CSR path on the CPU."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sparse_below = self.config.sparse_below if self.device.type == "cpu" else 0.0
        self.sparse_steps = 0

    def work(self, name: str, B: int) -> torch.Tensor:
        """The step's work tensor ``name`` for a batch of B rows, kept across steps."""
        S, n, d = self.S, self.n, self.d
        shapes = {
            "pre": (B, S * n),
            "dpre": (B, S * n),
            "err": (S, B, d),
            "dc": (S, B, n),
            "d_dn": (S, n, d),
            "d_w_enc": (d, S * n),
        }
        return self.scratch(name, shapes[name])

    @torch.no_grad()
    def forward_backward(self, x: torch.Tensor) -> Reductions:
        """Gradients of every SAE's loss on batch ``x`` into ``.grad``; statistics."""
        B, d = x.shape
        S, n = self.S, self.n
        norms, dn = self.unit_decoder()
        w_enc = self.encoder_weight(dn)

        codes = torch.addmm(self.b_enc, x, w_enc, out=self.work("pre", B)).clamp_(min=0)  # (B, S*n)
        codes3 = codes.view(B, S, n)
        codes_s = codes3.transpose(0, 1)  # (S, B, n) view
        # The active codes' 0/1 mask is kept in the tensor that becomes dL/d pre by one multiply
        # (torch.where on the transposed dc took 5.1 against 0.2 ms at 1,024 x 2,048).
        active = self.work("dpre", B).view(B, S, n)
        fired = firing_counts(codes3, active)  # (S, n), this rank's rows
        # Decided per step from this step's own codes: the sparse kernels pay off only when few
        # codes are active, which is true late in training and false at the start. The count is
        # read on the host only when the sparse path is possible at all (CPU).
        use_sparse = self.sparse_below > 0 and int(fired.sum()) < self.sparse_below * B * S * n
        if use_sparse:
            self.sparse_steps += 1
            pairs = [sparse.to_csr_pair(codes3[:, s].contiguous()) for s in range(S)]
            err = self.work("err", B)
            for s in range(S):
                err[s] = sparse.decode(pairs[s], dn[s])
            err.sub_(x)
        else:
            err = torch.bmm(codes_s, dn, out=self.work("err", B)).sub_(x)  # (S, B, d)

        self.count_stats(codes3, err, fired, B)

        g = err.mul_(2.0 / (B * d))
        d_dn = self.work("d_dn", B)
        # Untied, the encoder's gradient is written where it belongs; tied, it joins the decoder's.
        d_w_enc = self.work("d_w_enc", B) if self.tied else self.W_enc.grad  # (d, S*n)
        if use_sparse:
            l1_grad = (self.l1_coef / B).tolist()
            for s in range(S):
                cols = slice(s * n, (s + 1) * n)
                d_dn[s], d_w_enc[:, cols], self.b_enc.grad[cols] = sparse.backward(
                    pairs[s], g[s], dn[s], x, l1_grad[s]
                )
        else:
            torch.bmm(codes_s.transpose(1, 2), g, out=d_dn)  # (S, n, d)
            dc = torch.bmm(g, dn.transpose(1, 2), out=self.work("dc", B))  # (S, B, n)
            dc.add_((self.l1_coef / B).view(S, 1, 1))
            dpre = torch.mul(dc.transpose(0, 1), active, out=active).view(B, S * n)
            torch.mm(x.T, dpre, out=d_w_enc)  # (d, S*n)
            torch.sum(dpre, dim=0, out=self.b_enc.grad)
        if self.tied:
            d_dn += d_w_enc.view(d, S, n).permute(1, 2, 0)
        self.write_decoder_grad(d_dn, dn, norms)
        return {"fired": (fired, "sum")}


register_fast_path("relu", ReluFastGroup)
