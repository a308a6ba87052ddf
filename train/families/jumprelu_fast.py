"""The ``jumprelu`` family's fast path: after the encoder GEMM, the step touches only the codes
above threshold and the entries near it. Layout and loss are ``JumpReLUGroup``'s (checked against
it in tests/test_jumprelu_fast.py); only ``forward_backward`` differs.

With theta = exp(log_threshold), eps the bandwidth, u = (pre - theta) / eps, per dictionary s:
  active  pre > theta:  the codes v = pre, decoded and trained as any sparse codes
                        (``sparse_step.bag_step``: d code / d pre = 1 there, 0 elsewhere)
  window  |u| < 1/2:    the rectangle kernel's support, the only entries whose threshold
                        gradient is nonzero; dL/d code there is <g, Dn[j]> (active or not)
  d log_theta_j = theta_j * sum over the window's rows of
                  ( -(theta_j / eps) <g_b, Dn[j]>      the JumpReLU's straight-through term
                    - lambda_s / (eps B) )             the L0 penalty's, lambda_s / B per row
Both sets lie above theta - eps, so one pass over the (B, S*n) pre-activations finds them; the
entries in the window but not active enter the sparse step with value 0 (they change no sum)
so that one sampled product gives every entry's dL/d code. The L0 term gives the encoder no
gradient, as in the autograd group.

Early in training (theta near its small initial value) half the codes may be active: where
more than ``DENSE_ABOVE`` of the entries lie above theta - eps, the sparse kernels would be
slower than dense GEMMs (measured at 1024 -> 8192, batch 4096, load ~4.5: 4.1 vs 5.4 s per step
at 10% active, 5.5 vs 6.0 at 15%, 10.0 vs 5.4 at 25%), and the step is a dense hand-written one
(``dense_steps`` counts them) from the same pre-activations: the autograd group's GEMMs less its
second encoder GEMM. The choice depends only on the step's own pre-activations, so a resumed
run makes the same one.

Devices: on any device other than the CPU the group runs ``JumpReLUGroup``'s autograd step.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from unsuperpose.train.codes import firing_counts
from unsuperpose.train.families.jumprelu import JumpReLUGroup
from unsuperpose.train.families.sparse_step import (
    SMALL_STEP,
    bag_step,
    encode_into,
    one_thread,
    write_grads,
)
from unsuperpose.train.families.stacked import Reductions
from unsuperpose.train.registry import register_fast_path

DENSE_ABOVE = 0.1  # fraction of the (B, S*n) entries above theta - eps beyond which it is dense


class JumpReLUFastGroup(JumpReLUGroup):
    """``JumpReLUGroup`` whose CPU step is sparse after the encoder GEMM."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.fast = self.device.type == "cpu" and not self.tied
        self.dense_steps = 0

    @torch.no_grad()
    def forward_backward(self, x: torch.Tensor) -> Reductions:
        """Gradients of every dictionary's loss on batch ``x`` into ``.grad``; statistics."""
        if not self.fast:
            return super().forward_backward(x)
        B = len(x)
        S, n, eps = self.S, self.n, self.bandwidth
        norms, dn = self.unit_decoder()  # (S, n, 1), (S, n, d)
        pre = encode_into(self, x)  # (B, S, n): the one dense GEMM
        theta = self.threshold()  # (S, n)
        lower = theta - eps  # below every active entry and every entry of the window
        above = pre > lower  # (B, S, n)
        if int(above.sum()) > DENSE_ABOVE * pre.numel():  # counted before any index is made
            self.dense_steps += 1
            return self._dense_step(x, pre, theta, norms, dn)
        with one_thread() if pre.numel() < SMALL_STEP else nullcontext():
            found = []
            for s in range(S):
                flat = above[:, s].reshape(-1).nonzero().squeeze(1)  # b*n + j, ascending
                found.append((flat, torch.take(pre[:, s], flat)))
            with one_thread():
                rows = torch.cat([flat % n + s * n for s, (flat, _) in enumerate(found)])
                bags = torch.cat([flat // n + s * B for s, (flat, _) in enumerate(found)])
                p = torch.cat([vals for _, vals in found])
                th = theta.view(-1)[rows]
                active = p > th
                window = ((p - th) / eps).abs() < 0.5  # the reference's rectangle, as it writes it
                keep = (active | window).nonzero().squeeze(1)
                rows, bags, p, th = rows[keep], bags[keep], p[keep], th[keep]
                active, window = active[keep], window[keep]
                v = p * active
            dots, fired = bag_step(self, x, pre, norms, dn, rows, bags, v, active, auxk=False)
            with one_thread():
                coef = self.l0_coef[rows // n]
                d_theta = torch.where(window, -(th / eps) * dots - coef / (eps * B), 0.0)
                d_theta = torch.zeros(S * n, device=x.device).index_add_(0, rows, d_theta)
                self.extra["log_threshold"].grad.copy_(d_theta.mul_(theta.view(-1)))
            return {"fired": (fired, "sum"), **self.step_reductions()}

    def _dense_step(self, x, pre, theta, norms, dn) -> Reductions:
        """The same gradients with dense codes (batched GEMMs), from the step's pre-activations:
        what the autograd group computes, less its second encoder GEMM."""
        B, d = x.shape
        S, n, eps = self.S, self.n, self.bandwidth
        active = pre > theta  # (B, S, n)
        codes = pre * active
        codes_s = codes.transpose(0, 1)  # (S, B, n)
        err = torch.bmm(codes_s, dn).add_(self.b_dec.unsqueeze(1)).sub_(x)  # (S, B, d)
        fired = firing_counts(codes)
        self.count_stats(codes, err, fired, B)
        g = err.mul_(2.0 / B)
        d_codes = torch.bmm(g, dn.transpose(1, 2)).transpose(0, 1)  # (B, S, n)
        window = ((pre - theta) / eps).abs() < 0.5  # the reference's rectangle, as it writes it
        coef = self.l0_coef[:, None]  # (S, 1)
        d_theta = torch.where(window, -(theta / eps) * d_codes - coef / (eps * B), 0.0).sum(0)
        self.extra["log_threshold"].grad.copy_(d_theta.mul_(theta).view(-1))
        dpre = torch.mul(d_codes, active, out=torch.empty_like(pre))  # (B, S, n), contiguous
        db_enc = dpre.sum(dim=0).view(-1)
        d_dn = torch.bmm(codes_s.transpose(1, 2), g)  # (S, n, d)
        # dW_enc[:, s*n + j] = sum_b (x_b - b_dec_s) dpre[b, s, j]: one GEMM, then the bias.
        d_w = torch.mm(x.T, dpre.view(B, S * n)).view(d, S, n)
        d_w.sub_(self.b_dec.T.unsqueeze(-1) * db_enc.view(1, S, n))
        write_grads(self, g, d_dn.view(S * n, d), d_w.view(d, S * n).T, db_enc, norms, dn)
        return {"fired": (fired, "sum"), **self.step_reductions()}


register_fast_path("jumprelu", JumpReLUFastGroup)
