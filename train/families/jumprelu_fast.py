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
slower than dense GEMMs, and the step is the autograd group's (``dense_steps`` counts them).
The choice depends only on the step's own pre-activations, so a resumed run makes the same one.

Devices: on any device other than the CPU the group runs ``JumpReLUGroup``'s autograd step.
"""

from __future__ import annotations

import torch

from unsuperpose.train.families.jumprelu import JumpReLUGroup
from unsuperpose.train.families.sparse_step import (
    bag_step,
    encode_into,
    one_thread,
    work_buffers,
)
from unsuperpose.train.families.stacked import Reductions

DENSE_ABOVE = 0.1  # fraction of the (B, S*n) entries above theta - eps beyond which it is dense


class JumpReLUFastGroup(JumpReLUGroup):
    """``JumpReLUGroup`` whose CPU step is sparse after the encoder GEMM."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.fast = self.device.type == "cpu" and not self.tied
        self._buf: dict[str, torch.Tensor] = {}
        self.dense_steps = 0

    @torch.no_grad()
    def forward_backward(self, x: torch.Tensor) -> Reductions:
        """Gradients of every dictionary's loss on batch ``x`` into ``.grad``; statistics."""
        if not self.fast:
            return super().forward_backward(x)
        B = len(x)
        S, n, eps = self.S, self.n, self.bandwidth
        self._buf = buf = work_buffers(self, B, self._buf)
        norms = self.W_dec.norm(dim=-1, keepdim=True)
        dn = self.W_dec / norms  # (S, n, d)
        pre = encode_into(self, x, buf["pre"])  # (B, S, n): the one dense GEMM
        theta = self.threshold()  # (S, n)
        lower = theta - eps  # below every active entry and every entry of the window
        found, total = [], 0
        for s in range(S):
            flat = (pre[:, s] > lower[s]).view(-1).nonzero().squeeze(1)  # b*n + j, ascending
            found.append((flat, torch.take(pre[:, s], flat)))
            total += len(flat)
        if total > DENSE_ABOVE * pre.numel():
            self.dense_steps += 1
            return super().forward_backward(x)
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
        dots, fired = bag_step(self, x, pre, norms, dn, rows, bags, v, active, buf, auxk=False)
        with one_thread():
            coef = self.l0_coef[rows // n]
            d_theta = torch.where(window, -(th / eps) * dots - coef / (eps * B), 0.0)
            d_theta = torch.zeros(S * n, device=x.device).index_add_(0, rows, d_theta)
            self.extra["log_threshold"].grad.copy_(d_theta.mul_(theta.view(-1)))
        return {"fired": (fired, "sum"), **self.step_reductions()}
