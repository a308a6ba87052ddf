"""What the sparse CPU steps share (``topk_fast``, ``batchtopk_fast``, ``matryoshka_fast`` and
``jumprelu_fast``): after the encoder GEMM, a step touches only the active codes.

Codes are a flat list of entries: entry e is code value ``v[e]`` of stacked latent ``rows[e]``
(latent j of dictionary s is row s*n + j of the stacked decoder) in bag ``bags[e]`` (row b of
dictionary s is bag s*B + b), the entries grouped by bag, so ``crow`` (the bag offsets) makes
them a CSR matrix of shape (bags, S*n). TopK has exactly k entries per bag; BatchTopK and
JumpReLU a varying number. With g = dL/dx_hat per bag and Dn the unit decoder rows:

  x_hat  = sum over a bag's entries of v * Dn[rows]            embedding_bag (gather)
  dv     = <g[bag], Dn[row]> per entry                         ``sampled_dots``
  dDn    = C^T @ g,   dW_enc^T = C'^T @ (x - b_dec)            C (C') the codes (their dpre),
                                                               ``Transposed`` x dense (MKL)
  db_enc = sum of dpre per latent,  db_dec = sum_b g - W_enc @ db_enc
  dW_dec = (dDn - Dn <dDn, Dn>_row) / ||W_dec||_row            ``write_grads``

AuxK (``auxk.py``) works on the block of dead latents alone (``auxk_grads``): as dense GEMMs
over it while it is small next to k_aux (with at most k_aux dead latents its codes are simply
their ReLU'd pre-activations), as the same sparse computation on its own entries beyond.
``bag_step`` is the whole step for codes with any number of entries per bag (BatchTopK,
JumpReLU), and with Matryoshka's nested prefixes; TopK keeps its fixed (B, k) layout.

This is for the CPU, where a host read costs nothing and torch's sparse CSR kernels are MKL's;
the groups run their autograd step on any other device.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from unsuperpose.train.families.auxk import auxk_k, dead_for_auxk

# CSR support is marked beta in torch; the operations used here are stable on CPU.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Below this many pre-activations (B*S*n) a step runs everything after the encoder GEMM on one
# thread: its ops are small, and on a loaded machine every parallel region waits for a
# descheduled worker (toy grids at load ~5 on 2 cores: Matryoshka at 1024 latents 4.9k vs 0.7k
# samples/s with two threads throughout).
SMALL_STEP = 2**22

# dictionary s -> (its dead latents (m,), their dDn (m, d), dW_enc^T (m, d) and db_enc (m,))
AuxGrads = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

# AuxK runs as dense GEMMs on the block of dead latents while they number at most this many
# times k_aux (``dense_auxk``), as sparse entries beyond (``sparse_auxk``).
DENSE_AUXK = 8


@contextmanager
def one_thread():
    """Small ops (~B*k elements) on one thread: on a loaded machine every parallel region waits
    for a descheduled worker (measured ~8 ms each for 131k-element ops at load 4 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Transposed:
    """The entries (latent ``rows[e]``, bag ``bags[e]``) grouped by latent: a CSR pattern of
    shape (n_rows, n_bags) that any values given in entry order can be laid onto."""

    def __init__(self, rows: torch.Tensor, bags: torch.Tensor, n_rows: int, n_bags: int):
        # Stable: within a latent the bags stay ascending (sorted CSR columns) when the entries
        # come in bag order. Call on one thread: torch's parallel sort of B*k keys took 3 ms
        # alone, up to 200 ms under load.
        self.order = torch.argsort(rows, stable=True)
        # 32-bit indices where they fit: MKL takes them as they are (64-bit ones are converted
        # on every product).
        small = max(len(rows), n_rows, n_bags) < 2**31
        self.index = torch.int32 if small else torch.int64
        self.crow = torch.zeros(n_rows + 1, dtype=self.index, device=rows.device)
        torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=self.crow[1:])
        self.cols = bags[self.order].to(self.index)
        self.shape = (n_rows, n_bags)

    def with_bags(self, bags: torch.Tensor, n_bags: int) -> Transposed:
        """The same entries under other bag numbers (nondecreasing in the same entry order, so
        the columns stay sorted): one sort serves both."""
        other = object.__new__(Transposed)
        other.order, other.index, other.crow = self.order, self.index, self.crow
        other.cols = bags[self.order].to(self.index)
        other.shape = (self.shape[0], n_bags)
        return other

    def lay(self, values: torch.Tensor) -> torch.Tensor:
        """The (n_rows, n_bags) CSR matrix of ``values`` (in entry order) on this pattern."""
        return torch.sparse_csr_tensor(
            self.crow, self.cols, values[self.order], self.shape, check_invariants=False
        )


def mm_into(csr: torch.Tensor, dense: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = csr @ dense. beta=0: ``out`` is written, never read; this skips the zero fill
    and the copy of the result that ``torch.sparse.mm`` makes (22 vs 97 ms at 8192 x 1024)."""
    return torch.addmm(out, csr, dense, beta=0.0, out=out)


def sparse_products(
    group, codes_t: torch.Tensor, g: torch.Tensor, dpre_t: torch.Tensor, xc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked decoder's and (transposed) encoder's gradients, each (S*n, d), into the
    group's kept tensors: codes_t @ g and dpre_t @ xc, codes_t and dpre_t (S*n, bags) CSR."""
    shape = (group.S * group.n, group.d)
    d_dn = mm_into(codes_t, g, group.scratch("d_dn", shape))
    d_wt = mm_into(dpre_t, xc, group.scratch("d_wt", shape))
    return d_dn, d_wt


def sampled_dots(
    crow: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """(N,): <g[bag of e], table[idx[e]]> for every entry e; ``crow`` the bag offsets (int64, as
    ``idx``), g (bags, d)."""
    pattern = torch.sparse_csr_tensor(
        crow,
        idx,
        torch.zeros(len(idx), device=g.device),  # beta=0 would still read NaN garbage
        (g.shape[0], table.shape[0]),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, g, table.T, beta=0.0).values()


def fixed_offsets(bags: int, per_bag: int, device) -> torch.Tensor:
    """The bag offsets of ``bags`` bags of ``per_bag`` entries each."""
    return torch.arange(0, bags * per_bag + 1, per_bag, device=device)


def bag_offsets(bags: torch.Tensor, n_bags: int) -> torch.Tensor:
    """(n_bags + 1,) int64 offsets of entries grouped by bag (``bags`` nondecreasing)."""
    crow = torch.zeros(n_bags + 1, dtype=torch.int64, device=bags.device)
    torch.cumsum(torch.bincount(bags, minlength=n_bags), 0, out=crow[1:])
    return crow


def decode_bags(
    rows: torch.Tensor, v: torch.Tensor, crow: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """(bags, d): every bag's sum of v * table[rows] over its entries (0 for an empty bag)."""
    return F.embedding_bag(
        rows, table, crow, mode="sum", per_sample_weights=v, include_last_offset=True
    )


def encode_into(group, x: torch.Tensor) -> torch.Tensor:
    """(B, S, n) pre-activations, into the group's kept ``pre`` tensor (valid until the next
    step): the one dense GEMM, with the pre-encoder bias folded into the encoder bias (the same
    function as ``pre_activations``, rounded differently)."""
    B, S, n = len(x), group.S, group.n
    w3 = group.W_enc.view(group.d, S, n)
    shift = torch.einsum("sd,dsn->sn", group.b_dec, w3)
    out = group.scratch("pre", (B, S * n))
    pre = torch.addmm(group.b_enc - shift.reshape(-1), x, group.W_enc, out=out)
    return pre.view(B, S, n)


def write_grads(
    group,
    g: torch.Tensor,
    d_dn: torch.Tensor,
    d_wt: torch.Tensor,
    db_enc: torch.Tensor,
    norms: torch.Tensor,
    dn: torch.Tensor,
) -> None:
    """The four shared parameters' gradients into ``.grad``: g (S, rows, d) dL/dx_hat summed
    into the decoder bias, d_dn (S*n, d) dL/dDn (overwritten), d_wt (S*n, d) the encoder's
    gradient transposed, db_enc (S*n,), norms (S, n, 1) the raw decoder rows' norms."""
    S, n, d = group.S, group.n, group.d
    w3 = group.W_enc.view(d, S, n)
    group.W_enc.grad.copy_(d_wt.T)
    group.b_enc.grad.copy_(db_enc)
    db_dec = g.sum(dim=1) - torch.einsum("dsn,sn->sd", w3, db_enc.view(S, n))
    group.b_dec.grad.copy_(db_dec)
    group.write_decoder_grad(d_dn.view(S, n, d), dn, norms)


def auxk_grads(
    group, pre: torch.Tensor, err: torch.Tensor, dn: torch.Tensor, xc: torch.Tensor
) -> AuxGrads:
    """AuxK's gradient for each dictionary of ``group`` with dead latents (``auxk.py`` defines
    it), on the block of its dead latents only. pre (B, S, n), err (S, B, d) = x_hat - x of the
    full reconstruction, dn (S, n, d), xc (S, B, d) the encoder's input. Which latents are dead
    is read on the host, so a step with none dead skips AuxK (its loss and gradient are exactly
    0 there).

    With at most ``DENSE_AUXK`` * k_aux dead latents the codes are a dense (B, n_dead) block
    (``dense_auxk``), else a list of B*k_aux entries (``sparse_auxk``)."""
    coef = group.config.auxk.coef
    if coef == 0:
        return {}
    dead = dead_for_auxk(group)
    n_dead = dead.sum(dim=1).tolist()  # on the host: this path runs on the CPU only
    if not any(n_dead):
        return {}
    k_aux = auxk_k(group)
    with one_thread():
        # The residual the live latents left is e = -err; its variance once per step, from err.
        denom = (err - err.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2)).tolist()
    out = {}
    for s in range(group.S):
        if n_dead[s] == 0 or denom[s] <= 0:
            continue
        with one_thread():
            cols = dead[s].nonzero().squeeze(1)
            cand = pre[:, s].index_select(1, cols)  # (B, n_dead): only dead latents compete
            dd = dn[s].index_select(0, cols)  # (n_dead, d): their unit decoder rows
        ka = min(k_aux, n_dead[s])  # the rest of the reference's top k_aux are zeros
        # dL_aux / de_hat = c * (e_hat - e) = c * (e_hat + err)
        c = 2 * coef * min(n_dead[s] / k_aux, 1.0) / denom[s]
        step = dense_auxk if n_dead[s] <= DENSE_AUXK * k_aux else sparse_auxk
        out[s] = (cols, *step(cand, ka, dd, err[s], xc[s], c))
    return out


def dense_auxk(cand, ka, dd, err, xc, c):
    """AuxK's (dDn, dW_enc^T, db_enc) on the dead latents, their codes a dense (B, n_dead)
    block: four GEMMs of B*n_dead*d (decode, the codes' gradient, the decoder's and the
    encoder's), the pre-activations already the encoder GEMM's. Where n_dead <= k_aux every dead
    latent is among each row's top k_aux, so the codes are the block's ReLU, no top-k at all.
    Measured at 4096 rows, d 1024, load 9-10 on 2 cores (``sparse_auxk`` against this): 512
    dead, k_aux 512: 12-15 s against 0.7 s (MKL's sparse products are slow per entry); 4,096
    dead, k_aux 512 (1/8): 5.1-6.9 s against 4.6-5.7; 8,192 dead (1/16): 6.2-9.3 s against
    7.7-10.3; 4,096 dead, k_aux 128: 1.8-2.0 s against 5.7-5.8. Hence ``DENSE_AUXK`` 8.
    The GEMMs run on every thread, the elementwise work on one (see ``one_thread``)."""
    if ka < cand.shape[1]:
        av, ai = cand.topk(ka, dim=-1, sorted=False)
        with one_thread():
            codes = torch.zeros_like(cand).scatter_(1, ai, av.clamp_(min=0))
    else:
        with one_thread():
            codes = cand.clamp_(min=0)  # cand is index_select's copy: pre is untouched
    ga = torch.addmm(err, codes, dd, beta=c, alpha=c)  # c * (e_hat + err)
    dpre = ga @ dd.T
    with one_thread():
        dpre.mul_(codes > 0)  # ReLU's and the selection's gradient mask
        db = dpre.sum(dim=0)
    return codes.T @ ga, dpre.T @ xc, db


def sparse_auxk(cand, ka, dd, err, xc, c):
    """AuxK's (dDn, dW_enc^T, db_enc) on the dead latents, their codes each row's top k_aux as
    B*k_aux entries: the sparse step of ``sparse_step``'s docstring on the dead block."""
    B, m = cand.shape
    av, ai = cand.topk(ka, dim=-1, sorted=False)
    with one_thread():
        av = av.clamp_(min=0).reshape(-1)
        rows = ai.reshape(-1)  # latents numbered within the dead block
        bags = torch.arange(B, device=cand.device).repeat_interleave(ka)
        tr = Transposed(rows, bags, m, B)
        codes_t = tr.lay(av)
    e_hat = F.embedding_bag(rows.view(B, ka), dd, per_sample_weights=av.view(B, ka), mode="sum")
    ga = e_hat.add_(err).mul_(c)
    dpre = sampled_dots(fixed_offsets(B, ka, cand.device), rows, ga, dd).mul_(av > 0)
    d_dn = mm_into(codes_t, ga, torch.empty(m, dd.shape[1], device=cand.device))
    d_wt = mm_into(tr.lay(dpre), xc, torch.empty(m, dd.shape[1], device=cand.device))
    with one_thread():
        db = torch.zeros(m, device=cand.device).index_add_(0, rows, dpre)
    return d_dn, d_wt, db


def add_auxk(aux: AuxGrads, n: int, db_enc, d_dn, d_wt) -> None:
    """AuxK's gradients added into the step's (stacked) db_enc, dDn and dW_enc^T, on one thread
    (512 rows of 1,024 into dDn: 0.1 ms on one thread, 120 ms on two at load 6)."""
    with one_thread():
        for s, (cols, d_dn_a, d_wt_a, db_a) in aux.items():
            rows = cols + s * n
            d_dn.index_add_(0, rows, d_dn_a)
            d_wt.index_add_(0, rows, d_wt_a)
            db_enc.index_add_(0, rows, db_a)


def bag_step(
    group,
    x: torch.Tensor,
    pre: torch.Tensor,
    norms: torch.Tensor,
    dn: torch.Tensor,
    rows: torch.Tensor,
    bags: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    *,
    auxk: bool,
    prefixes: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse step of codes with any number of entries per bag: statistics, decode, the
    reconstruction's gradients (and AuxK's with ``auxk``) into ``.grad``.

    rows, bags, v (N,) the entries in bag order (bag s*B + b nondecreasing) and, within a bag,
    by latent where ``prefixes`` are given; active (N,) where d code / d pre is 1 (else 0); pre
    (B, S, n) for AuxK. Returns dL/d code of every entry (N,) and the firing counts (S, n).

    ``prefixes`` (Matryoshka): increasing sizes m_1 < ... < m_P = n, each prefix's own
    reconstruction loss counted (the last is the whole dictionary's). Latent j belongs to the
    prefixes p with j < m_p, i.e. from its bucket q(j) = #{m_p <= j} on, so each bag (s, b) is
    split into P sub-bags (s, b, q): one embedding_bag decodes every bucket, a cumulative sum
    over q makes the P reconstructions, and an entry's gradient is <G_q, Dn[j]> with
    G_q = sum_{p >= q} g_p, a cumulative sum from the other end.
    """
    B, d = x.shape
    S, n = group.S, group.n
    table = dn.view(S * n, d)
    P = len(prefixes) if prefixes else 1
    with one_thread():
        fired = torch.zeros(S * n, dtype=torch.int64, device=x.device)
        fired = fired.index_add_(0, rows, (v != 0).long()).view(S, n)
        group.stats[1] += torch.zeros(S, device=x.device).index_add_(0, bags // B, v)
        group.stats[2] += fired.sum(dim=1)
        group.stat_rows += B
        sub = bags
        if P > 1:
            bounds = torch.tensor(prefixes, device=x.device)
            sub = bags * P + torch.bucketize(rows % n, bounds, right=True)
        crow = bag_offsets(sub, S * B * P)
        tr = Transposed(rows, sub, S * n, S * B * P)
        codes_t = tr.lay(v)  # (S*n, S*B*P)

    err = decode_bags(rows, v, crow, table).view(S, B, P, d)
    for q in range(1, P):  # bucket sums -> prefix reconstructions
        err[:, :, q] += err[:, :, q - 1]
    err.add_(group.b_dec[:, None, None]).sub_(x[:, None])  # (S, B, P, d)
    full = err[:, :, P - 1]  # (S, B, d): the whole dictionary's error
    group.stats[0] += torch.linalg.vector_norm(full, dim=(1, 2)).square()
    xc = x - group.b_dec.unsqueeze(1)  # (S, B, d): the encoder's input, per s
    aux = auxk_grads(group, pre, full, dn, xc) if auxk else {}

    g = err.mul_(2.0 / B)  # every prefix's dL/dx_hat
    for q in range(P - 2, -1, -1):  # -> G_q, what the entries of bucket q reconstruct into
        g[:, :, q] += g[:, :, q + 1]
    g_sub = g.view(S * B * P, d)
    dots = sampled_dots(crow, rows, g_sub, table)
    with one_thread():
        dpre = dots * active
        dpre_t = (tr if P == 1 else tr.with_bags(bags, S * B)).lay(dpre)
        db_enc = torch.zeros(S * n, device=x.device).index_add_(0, rows, dpre)
    d_dn, d_wt = sparse_products(group, codes_t, g_sub, dpre_t, xc.view(S * B, d))
    add_auxk(aux, n, db_enc, d_dn, d_wt)
    # Every prefix's reconstruction adds the decoder bias: its gradient is G_0's.
    write_grads(group, g[:, :, 0], d_dn, d_wt, db_enc, norms, dn)
    return dots, fired
