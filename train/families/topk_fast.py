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
AuxK (``auxk.py``) is the same computation on its own sparse codes: each row's top k_aux of
ReLU(pre) among the dead latents, reconstructing the residual; its dpre joins the encoder
gradient and its codes the decoder gradient. Which latents are dead is read on the host, so a
step with none dead skips AuxK (its loss and gradient are exactly 0 there).

Devices: this path is for the CPU, where a host read costs nothing and torch's sparse CSR kernels
are MKL's. On any other device the group runs ``TopKGroup``'s autograd step unchanged (no host
syncs, the AuxK work done every step).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from unsuperpose.train.families.auxk import auxk_k, dead_for_auxk
from unsuperpose.train.families.stacked import Reductions
from unsuperpose.train.families.topk import TopKGroup

# CSR support is marked beta in torch; the operations used here are stable on CPU.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@contextmanager
def _one_thread():
    """Small ops (~B*k elements) on one thread: on a loaded machine every parallel region waits
    for a descheduled worker (measured ~8 ms each for 131k-element ops at load 4 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Transposed:
    """The entries (latent ``rows[e]``, bag ``bags[e]``) grouped by latent: a CSR pattern of
    shape (n_rows, n_bags) that any values given in entry order can be laid onto."""

    def __init__(self, rows: torch.Tensor, bags: torch.Tensor, n_rows: int, n_bags: int):
        # Stable: within a latent the bags stay ascending (sorted CSR columns). Call on one
        # thread: torch's parallel sort of B*k keys took 3 ms alone, up to 200 ms under load.
        self.order = torch.argsort(rows, stable=True)
        # 32-bit indices where they fit: MKL takes them as they are (64-bit ones are converted
        # on every product).
        small = max(len(rows), n_rows, n_bags) < 2**31
        index = torch.int32 if small else torch.int64
        self.crow = torch.zeros(n_rows + 1, dtype=index, device=rows.device)
        torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=self.crow[1:])
        self.cols = bags[self.order].to(index)
        self.shape = (n_rows, n_bags)

    def lay(self, values: torch.Tensor) -> torch.Tensor:
        """The (n_rows, n_bags) CSR matrix of ``values`` (in entry order) on this pattern."""
        return torch.sparse_csr_tensor(
            self.crow, self.cols, values[self.order], self.shape, check_invariants=False
        )


def _mm(csr: torch.Tensor, dense: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = csr @ dense. beta=0: ``out`` is written, never read; this skips the zero fill
    and the copy of the result that ``torch.sparse.mm`` makes (22 vs 97 ms at 8192 x 1024)."""
    return torch.addmm(out, csr, dense, beta=0.0, out=out)


def _sampled_dots(
    idx: torch.Tensor, g: torch.Tensor, table: torch.Tensor, bag_k: int
) -> torch.Tensor:
    """(N,): <g[e // bag_k], table[idx[e]]> for every entry e of the flat ``idx``."""
    rows = g.shape[0]
    crow = torch.arange(0, rows * bag_k + 1, bag_k, device=idx.device)
    pattern = torch.sparse_csr_tensor(
        crow,
        idx,
        torch.zeros(len(idx), device=g.device),  # beta=0 would still read NaN garbage
        (rows, table.shape[0]),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, g, table.T, beta=0.0).values()


class TopKFastGroup(TopKGroup):
    """``TopKGroup`` whose CPU step is sparse after the encoder GEMM."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.fast = self.device.type == "cpu" and not self.tied
        self._buf: dict[str, torch.Tensor] = {}

    def _work(self, B: int) -> dict[str, torch.Tensor]:
        """Work tensors reused across steps (fresh allocations of this size page-fault every
        step): pre-activations, the two sparse products, each entry's bag s*B + b."""
        if not self._buf or self._buf["pre"].shape[0] != B:
            S, n, d = self.S, self.n, self.d
            new = lambda *shape: torch.empty(shape, device=self.device)  # noqa: E731
            self._buf = {
                "pre": new(B, S * n),
                "d_dn": new(S * n, d),
                "d_wt": new(S * n, d),
                "bags": torch.arange(S * B, device=self.device).repeat_interleave(self.k_max),
            }
        return self._buf

    @torch.no_grad()
    def forward_backward(self, x: torch.Tensor) -> Reductions:
        """Gradients of every dictionary's loss on batch ``x`` into ``.grad``; statistics."""
        if not self.fast:
            return super().forward_backward(x)
        B, d = x.shape
        S, n, K = self.S, self.n, self.k_max
        buf = self._work(B)
        norms = self.W_dec.norm(dim=-1, keepdim=True)
        dn = self.W_dec / norms  # (S, n, d)
        table = dn.view(S * n, d)
        w3 = self.W_enc.view(d, S, n)

        # Encoder: the one dense GEMM, with the pre-encoder bias folded into the encoder bias.
        shift = torch.einsum("sd,dsn->sn", self.b_dec, w3)
        pre = torch.addmm(self.b_enc - shift.reshape(-1), x, self.W_enc, out=buf["pre"])
        pre = pre.view(B, S, n)
        vals, idx = pre.topk(K, dim=-1, sorted=self.rank_keep is not None)  # (B, S, K)
        with _one_thread():
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
            tr = _Transposed(rows, buf["bags"], S * n, S * B)
            codes_t = tr.lay(v)  # (S*n, S*B)

        # Decoder: gather the active atoms.
        x_hat = F.embedding_bag(
            rows.view(S * B, K), table, per_sample_weights=v.view(S * B, K), mode="sum"
        )
        err = x_hat.view(S, B, d).add_(self.b_dec.unsqueeze(1)).sub_(x)  # (S, B, d)
        self.stats[0] += torch.linalg.vector_norm(err, dim=(1, 2)).square()
        xc = (x - self.b_dec.unsqueeze(1)).view(S * B, d)  # the encoder's input, per s
        aux = self._auxk(pre, err, dn, xc.view(S, B, d))  # before err becomes the gradient

        g = err.mul_(2.0 / B).view(S * B, d)
        dpre = _sampled_dots(rows, g, table, K)
        with _one_thread():
            dpre.mul_(active)
            dpre_t = tr.lay(dpre)  # (S*n, S*B)
            db_enc = torch.zeros(S * n, device=self.device).index_add_(0, rows, dpre)
            for s, (rows_a, _, _, dpre_a) in aux.items():
                db_enc[s * n : (s + 1) * n].index_add_(0, rows_a, dpre_a)
        d_dn = _mm(codes_t, g, buf["d_dn"])  # (S*n, d)
        d_wt = _mm(dpre_t, xc, buf["d_wt"])  # (S*n, d): the encoder gradient, transposed
        for s, (_, d_dn_a, d_wt_a, _) in aux.items():
            d_dn[s * n : (s + 1) * n] += d_dn_a
            d_wt[s * n : (s + 1) * n] += d_wt_a

        self.W_enc.grad.copy_(d_wt.T)
        self.b_enc.grad.copy_(db_enc)
        db_dec = g.view(S, B, d).sum(dim=1) - torch.einsum("dsn,sn->sd", w3, db_enc.view(S, n))
        self.b_dec.grad.copy_(db_dec)
        # Through dn = W_dec / ||W_dec||: (dDn - dn <dDn, dn>) / ||W_dec||, in two passes.
        d_dn = d_dn.view(S, n, d)
        inv = norms.reciprocal()
        radial = torch.linalg.vecdot(d_dn, dn).unsqueeze(-1).mul_(inv).neg_()
        torch.mul(d_dn, inv, out=self.W_dec.grad).addcmul_(dn, radial)
        return {"fired": (fired, "sum"), **self.step_reductions()}

    def _auxk(
        self, pre: torch.Tensor, err: torch.Tensor, dn: torch.Tensor, xc: torch.Tensor
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """AuxK's gradient, sparse, for each dictionary with dead latents: s -> (latents of its
        entries, dDn (n, d), dW_enc^T (n, d), dpre of the entries). ``auxk.py`` defines it."""
        coef = self.config.auxk.coef
        if coef == 0:
            return {}
        dead = dead_for_auxk(self)
        n_dead = dead.sum(dim=1).tolist()  # on the host: this path runs on the CPU only
        if not any(n_dead):
            return {}
        k_aux = auxk_k(self)
        e = -err  # the residual the live latents left, (S, B, d)
        denom = (e - e.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2)).tolist()
        B, d = e.shape[1:]
        out = {}
        for s in range(self.S):
            if n_dead[s] == 0 or denom[s] <= 0:
                continue
            cols = dead[s].nonzero().squeeze(1)
            cand = pre[:, s].index_select(1, cols)  # (B, n_dead): only dead latents compete
            ka = min(k_aux, n_dead[s])  # the rest of the reference's top k_aux are zeros
            av, ai = cand.topk(ka, dim=-1, sorted=False)
            with _one_thread():
                av = av.clamp_(min=0).reshape(-1)
                rows_a = cols[ai].reshape(-1)
                bags_a = torch.arange(B, device=self.device).repeat_interleave(ka)
                tr = _Transposed(rows_a, bags_a, self.n, B)
                codes_t = tr.lay(av)
            e_hat = F.embedding_bag(
                rows_a.view(B, ka), dn[s], per_sample_weights=av.view(B, ka), mode="sum"
            )
            scale = min(n_dead[s] / k_aux, 1.0)
            ga = e_hat.sub_(e[s]).mul_(2 * coef * scale / denom[s])  # dL_aux / de_hat
            dpre_a = _sampled_dots(rows_a, ga, dn[s], ka).mul_(av > 0)
            d_dn_a = _mm(codes_t, ga, torch.empty(self.n, d, device=self.device))
            d_wt_a = _mm(tr.lay(dpre_a), xc[s], torch.empty(self.n, d, device=self.device))
            out[s] = (rows_a, d_dn_a, d_wt_a, dpre_a)
        return out
