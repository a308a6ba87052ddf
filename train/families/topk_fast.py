"""The ``topk`` family's fast path: after the encoder GEMM, the step touches only active codes.

A TopK SAE's codes have at most k nonzeros per row from the first step, so only the encoder's
forward GEMM needs to be dense; everything after it costs ~nnz*d instead of B*n*d. Layout and
loss are ``TopKGroup``'s (checked against it in tests/test_topk_fast.py); only
``forward_backward`` differs. With v (B, k) the kept values and j (B, k) their latents, per
dictionary s (all S at once: latent j of s is row s*n + j of the stacked decoder):

  pre    = (x - b_dec) @ W_enc + b_enc                       the one dense GEMM
  v, j   = topk_k(pre) per row, v = ReLU(v)                  (ReLU after top-k: same codes)
  x_hat  = sum_k v * Dn[j] + b_dec                           embedding_bag (gather)
  g      = dL/dx_hat = 2 (x_hat - x) / B
  dv     = <g, Dn[j]>                                        sampled product at (b, j) only
  dpre   = dv * [v > 0]                                      sparse, B*k entries
  dDn    = C^T @ g,    C = the codes as a CSR matrix         sparse^T x dense
  dW_enc = (C'^T @ (x - b_dec))^T,  C' = C with dpre         sparse^T x dense, transposed copy
  db_enc = sum of dpre per latent (index_add),  db_dec = sum_b g - W_enc @ db_enc
  dW_dec = (dDn - Dn * <dDn, Dn>_row) / ||W_dec||_row        rows no code touched get 0

C^T is built once per step (a stable sort of the latent indices) and serves both dDn and dW_enc.
AuxK (``auxk.py``: each row's top k_aux of ReLU(pre) among the dead latents, reconstructing the
residual) runs on the dead latents' block only (``sparse_step.auxk_grads``); its gradients join
the encoder's, the decoder's and the encoder bias's. Which latents are dead is read on the host,
so a step with none dead skips AuxK (its loss and gradient are exactly 0 there).

The pieces every sparse step shares are in ``sparse_step.py``.

Devices: this path is for the CPU, where a host read costs nothing and torch's sparse CSR kernels
are MKL's. On any other device the group runs ``TopKGroup``'s autograd step unchanged (no host
syncs, the AuxK work done every step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unsuperpose.train.families.sparse_step import (
    Transposed,
    add_auxk,
    auxk_grads,
    encode_into,
    fixed_offsets,
    one_thread,
    sampled_dots,
    sparse_products,
    write_grads,
)
from unsuperpose.train.families.stacked import Reductions
from unsuperpose.train.families.topk import TopKGroup
from unsuperpose.train.registry import register_fast_path


class TopKFastGroup(TopKGroup):
    """``TopKGroup`` whose CPU step is sparse after the encoder GEMM."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.fast = self.device.type == "cpu" and not self.tied

    def entry_bags(self, B: int) -> torch.Tensor:
        """(S*B*K,): each entry's bag s*B + b, the same every step of batch size B."""
        S, K = self.S, self.k_max

        def fill(t: torch.Tensor) -> None:
            t.copy_(torch.arange(S * B, device=self.device).unsqueeze(1))

        return self.scratch("entry_bags", (S * B, K), torch.int64, fill).view(-1)

    @torch.no_grad()
    def forward_backward(self, x: torch.Tensor) -> Reductions:
        """Gradients of every dictionary's loss on batch ``x`` into ``.grad``; statistics."""
        if not self.fast:
            return super().forward_backward(x)
        B, d = x.shape
        S, n, K = self.S, self.n, self.k_max
        norms, dn = self.unit_decoder()  # (S, n, 1), (S, n, d)
        table = dn.view(S * n, d)
        pre = encode_into(self, x)  # (B, S, n): the one dense GEMM
        vals, idx = pre.topk(K, dim=-1, sorted=self.rank_keep is not None)  # (B, S, K)
        with one_thread():
            vals.clamp_(min=0)
            if self.rank_keep is not None:  # dictionary s keeps its top k_s ranks only
                vals.mul_(self.rank_keep)
            offsets = torch.arange(S, device=self.device).view(1, S, 1) * n
            # Entries in (s, b, rank) order: entry e belongs to bag e // K = s*B + b.
            rows = (idx + offsets).transpose(0, 1).reshape(-1)  # stacked latent of each entry
            v = vals.transpose(0, 1).reshape(-1)
            active = v > 0
            fired = torch.zeros(S * n, dtype=torch.int64, device=self.device)
            fired = fired.index_add_(0, rows, active.long()).view(S, n)
            self.stats[1] += v.view(S, -1).sum(dim=1)
            self.stats[2] += fired.sum(dim=1)
            self.stat_rows += B
            tr = Transposed(rows, self.entry_bags(B), S * n, S * B)
            codes_t = tr.lay(v)  # (S*n, S*B)

        # Decoder: gather the active atoms.
        x_hat = F.embedding_bag(
            rows.view(S * B, K), table, per_sample_weights=v.view(S * B, K), mode="sum"
        )
        err = x_hat.view(S, B, d).add_(self.b_dec.unsqueeze(1)).sub_(x)  # (S, B, d)
        self.stats[0] += torch.linalg.vector_norm(err, dim=(1, 2)).square()
        xc = (x - self.b_dec.unsqueeze(1)).view(S * B, d)  # the encoder's input, per s
        aux = auxk_grads(self, pre, err, dn, xc.view(S, B, d))  # before err becomes g

        g = err.mul_(2.0 / B).view(S * B, d)
        dpre = sampled_dots(fixed_offsets(S * B, K, self.device), rows, g, table)
        with one_thread():
            dpre.mul_(active)
            dpre_t = tr.lay(dpre)  # (S*n, S*B)
            db_enc = torch.zeros(S * n, device=self.device).index_add_(0, rows, dpre)
        d_dn, d_wt = sparse_products(self, codes_t, g, dpre_t, xc)  # (S*n, d) each
        add_auxk(aux, n, db_enc, d_dn, d_wt)
        write_grads(self, g.view(S, B, d), d_dn, d_wt, db_enc, norms, dn)
        return {"fired": (fired, "sum"), **self.step_reductions()}


register_fast_path("topk", TopKFastGroup)
