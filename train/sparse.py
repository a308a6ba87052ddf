"""The SAE step on active entries only: once training settles, codes are sparse (L0 << n).

Only the encoder's forward GEMM must stay dense. Given the codes as a CSR matrix C (B x n):
  x_hat  = C @ Dn                  decoder forward             (sparse x dense)
  dDn    = C^T @ g                 decoder gradient            (sparse^T x dense)
  dc     = (g @ Dn^T) at C's nonzeros only                     (SDDMM: sampled dense product)
  dW_enc = (dpre^T @ x)^T          with dpre = dc + alpha/(mB) on C's nonzeros (ReLU passes
                                   gradient only where a code is active)
Each costs ~2*nnz*d FLOPs instead of 2*B*n*d, and gives the dense path's numbers up to float
summation order (tested). The transpose C^T is built once per step by a stable sort of the
column indices and reused for both products that need it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# CSR support is marked beta in torch; the operations used here are stable on CPU.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass
class CSRPair:
    csr: torch.Tensor  # (B, n)
    csr_t: torch.Tensor  # (n, B), the same entries
    order: torch.Tensor  # csr.values()[order] are csr_t's values
    cols: torch.Tensor  # column (latent) of each of csr's entries


def to_csr_pair(codes: torch.Tensor) -> CSRPair:
    csr = codes.to_sparse_csr()
    B, n = codes.shape
    crow, cols = csr.crow_indices(), csr.col_indices()
    rows = torch.repeat_interleave(torch.arange(B), crow[1:] - crow[:-1])
    order = torch.argsort(cols, stable=True)
    crow_t = torch.zeros(n + 1, dtype=crow.dtype)
    torch.cumsum(torch.bincount(cols, minlength=n), 0, out=crow_t[1:])
    csr_t = torch.sparse_csr_tensor(
        crow_t, rows[order], csr.values()[order], (n, B), check_invariants=False
    )
    return CSRPair(csr, csr_t, order, cols)


def decode(pair: CSRPair, dn: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(pair.csr, dn)


def backward(
    pair: CSRPair, g: torch.Tensor, dn: torch.Tensor, x: torch.Tensor, l1_grad: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dDn (n, d), dW_enc (d, n), db_enc (n,)) for one SAE from its active entries."""
    n = dn.shape[0]
    d_dn = torch.sparse.mm(pair.csr_t, g)
    dc = torch.sparse.sampled_addmm(pair.csr, g, dn.T, beta=0.0)
    dpre_vals = dc.values().add_(l1_grad)
    dpre_t = torch.sparse_csr_tensor(
        pair.csr_t.crow_indices(),
        pair.csr_t.col_indices(),
        dpre_vals[pair.order],
        pair.csr_t.shape,
        check_invariants=False,
    )
    d_w_enc = torch.sparse.mm(dpre_t, x).T
    db = torch.zeros(n).index_add_(0, pair.cols, dpre_vals)
    return d_dn, d_w_enc, db
