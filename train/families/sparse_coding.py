"""``sparse-coding``: an overcomplete dictionary learnt by alternating sparse inference (FISTA)
with dictionary updates, fitted from the training rows in one pass (a baseline, not an SAE).

The model is Olshausen & Field's (1996, 1997): a row x is explained as c @ D with few non-zero
codes c, D's n rows unit atoms. Each row's codes solve the lasso

    c(x) = argmin_{c >= 0}  0.5 ||x - c D||^2 + alpha ||c||_1            (per row, no 1/d)

which is scikit-learn's ``sparse_encode(..., algorithm="lasso_cd", alpha=alpha,
positive=True)`` objective exactly (it divides both terms by d before calling ``Lasso``).
``alpha`` is the family's knob (``--l1``); a larger one gives fewer active codes.

Inference: FISTA (Beck & Teboulle 2009), fixed ``iters`` iterations from c = 0, step 1/L with
L = the largest eigenvalue of D D^T (exact, ``eigvalsh`` of the smaller of the two Gram
matrices, computed once per dictionary). With M = I - D D^T / L and q = x D^T / L a gradient step
is ``y @ M + q``, one (b, n) @ (n, n) GEMM; when n > 2d the two thin products (y @ D) @ D^T
are cheaper and are used instead (same iterate, another rounding). Fixed iterations and no early
stop keep it deterministic and free of host syncs on a GPU. With ``positive`` (the default) the
codes are >= 0, like an SAE's ReLU codes and the toy truth; ``--no-sparse-coding-positive`` gives
the signed lasso.

Learning: online dictionary learning (Mairal, Bach, Ponce & Sapiro 2009, "Online dictionary
learning for sparse coding", Algorithms 1 and 2), the algorithm scikit-learn's
``MiniBatchDictionaryLearning`` implements, our peer. Per batch X (b, d):
1. C = FISTA codes of X on the current D;
2. sufficient statistics A = weighted mean of C^T C / b, B = weighted mean of C^T X / b;
3. one block-coordinate sweep over the atoms in order, d_k <- unit(d_k + (B_k - A_k D) / A_kk),
   the exact minimiser of the surrogate 0.5 tr(D^T A D) - tr(D^T B) in atom k, then projected.
Forgetting: batch j enters A and B with weight j^rho (``forget`` = rho), so A_t = sum_j j^rho
S_j / sum_j j^rho. rho = 0 is Mairal's plain average; rho > 0 discounts early batches, whose codes
came from a poor dictionary: this is Mairal et al. 2010 (JMLR) s. 3.4.2's beta_t = (1 - 1/t)^rho,
normalised so A is a mean whatever rho is. (scikit-learn's own schedule forgets more early on.)
The default rho = 10 (weight mostly on the last ~1/11 of the batches read) was chosen on the
toy data (seed 101, 30,720 rows, 512 atoms, alpha 0.05, 50 FISTA iterations): MMCS 0.83, 0.88,
0.91, 0.94 at rho 1, 3, 6, 10 (a planted 32-atom test agrees).

Every penalty of the grid is learnt in the same pass: the S dictionaries are stacked (S, n, d)
and share each batch, so the stream is read once per size (plus once for the moments).

Choices and deviations, each for a reason:
- Data: centred on the training mean and divided by one scalar, scale = sqrt(E ||x - mean||^2)
  (both from ``FitData.moments``), so a scaled row has mean squared norm 1 and alpha means the
  same on toy data and on any LM layer; mean and scale are stored, and encode/decode undo them.
  scikit-learn neither centres nor scales.
- Atoms are kept at unit norm (projected onto the sphere), not in the ball ||d|| <= 1 as in
  Mairal: ``atoms()`` must be unit rows, and with an L1 penalty a used atom sits on the sphere
  anyway (a shorter one costs more L1).
- Initialisation: n distinct training rows (scaled and normalised) from the first ceil(n / b)
  batches, chosen by a generator seeded by the run's seed and n; the same start for every alpha.
  Rows short of n (a tiny budget) or of zero norm are filled with random unit directions.
- Unused atoms: an atom with no non-zero code in the last ``resample_rows`` training rows is
  replaced by a uniformly drawn row of the current batch (scaled, unit norm) and its statistics
  are zeroed, as SPAMS and scikit-learn replace atoms whose A_kk vanishes; counting rows rather
  than thresholding A_kk lets a new atom live late in the fit, where its weight in A is tiny.
  An atom whose A_kk is exactly 0 (never used since it was drawn) is not updated.
- One pass over the budget (``steps x batch_size`` rows, the rows an SAE of the same run sees);
  scikit-learn's peer iterates over a fixed array instead.
- No gradient flows through inference (``fista`` runs under ``no_grad``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from unsuperpose.seeding import seeded_generator
from unsuperpose.train.config import SAETrainConfig, SparseCodingOptions
from unsuperpose.train.dictionary import StoredDictionary
from unsuperpose.train.knobs import L1
from unsuperpose.train.registry import Family, register

_INIT_STREAM = 7_101  # the initialisation's key beside the run's seed and the size
_RESAMPLE_STREAM = 7_102  # the resampling draws' key


def largest_eigenvalue(D: torch.Tensor) -> torch.Tensor:
    """The largest eigenvalue of D D^T per (stacked) dictionary D (..., n, d): the Lipschitz
    constant of the lasso's smooth part, from the smaller Gram matrix (same non-zero spectrum)."""
    n, d = D.shape[-2:]
    gram = D @ D.mT if n <= d else D.mT @ D
    return torch.linalg.eigvalsh(gram)[..., -1]


def _per_dictionary(value, like: torch.Tensor, stacked: bool) -> torch.Tensor:
    """A scalar or one value per stacked dictionary, shaped to broadcast over (S, b, n)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1, 1) if stacked and t.ndim == 1 else t


@torch.no_grad()
def fista(
    x: torch.Tensor,
    D: torch.Tensor,
    alpha,
    iters: int,
    positive: bool = True,
    *,
    lipschitz: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Codes minimising 0.5 ||x - c D||^2 + alpha ||c||_1 per row (c >= 0 when ``positive``).

    x (b, d) with D (n, d) gives (b, n); with S stacked dictionaries D (S, n, d), x (b, d) or
    (S, b, d), and alpha a float or (S,) values, the codes are (S, b, n). ``lipschitz``: the
    largest eigenvalue of D D^T per dictionary, when the caller has it. Computed in x's dtype on
    x's device.
    """
    D = D.to(x.dtype)
    stacked = D.ndim == 3
    n, d = D.shape[-2:]
    L = largest_eigenvalue(D) if lipschitz is None else lipschitz
    step = 1.0 / _per_dictionary(L, x, stacked)
    threshold = _per_dictionary(alpha, x, stacked) * step
    q = (x @ D.mT) * step  # the gradient's constant part, taken once
    gram_path = n <= 2 * d
    if gram_path:
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        M = eye - (D @ D.mT) * step
    else:
        minus_step_Dt = -(D.mT * step)
    c = torch.zeros_like(q)
    y, t = c, 1.0
    for _ in range(iters):
        # z = y - step * (y D D^T - x D^T), the gradient step from the momentum point
        if gram_path:
            z = torch.baddbmm(q, y, M) if q.ndim == 3 else torch.addmm(q, y, M)
        elif q.ndim == 3:
            z = torch.baddbmm(y + q, y @ D, minus_step_Dt)
        else:
            z = torch.addmm(y + q, y @ D, minus_step_Dt)
        if positive:
            c_next = torch.relu(z - threshold)
        else:
            c_next = torch.sign(z) * torch.relu(z.abs() - threshold)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = c_next + ((t - 1.0) / t_next) * (c_next - c)
        c, t = c_next, t_next
    return c


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def initial_atoms(rows: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n unit atoms from distinct rows of ``rows`` (scaled data), drawn by ``generator``; random
    unit directions where there are too few rows or a row is zero."""
    d = rows.shape[1]
    pick = torch.randperm(len(rows), generator=generator, device=generator.device)[:n]
    atoms = torch.randn(n, d, generator=generator, device=generator.device).to(rows)
    chosen = rows[pick.to(rows.device)]
    nonzero = chosen.norm(dim=1) > 1e-8
    atoms[: len(chosen)][nonzero] = chosen[nonzero]
    return _unit_rows(atoms)


class OnlineDictionaryLearner:
    """S dictionaries of one size (one per alpha) learnt side by side from shared batches.

    Holds the state of Mairal et al.'s algorithm: the atoms D (S, n, d), the statistics A
    (S, n, n) and B (S, n, d), and the rows since each atom was last used.
    """

    def __init__(
        self,
        init: torch.Tensor,
        alphas: list[float],
        *,
        iters: int,
        positive: bool,
        forget: float,
        resample_rows: int,
        generator: torch.Generator,
    ):
        S, (n, d) = len(alphas), init.shape
        self.D = init.expand(S, n, d).clone()
        self.A = torch.zeros(S, n, n, dtype=init.dtype, device=init.device)
        self.B = torch.zeros(S, n, d, dtype=init.dtype, device=init.device)
        self.alphas = torch.tensor(alphas, dtype=init.dtype, device=init.device)
        self.idle_rows = torch.zeros(S, n, dtype=torch.long, device=init.device)
        self.iters, self.positive, self.forget = iters, positive, forget
        self.resample_rows = resample_rows
        self.generator = generator
        self.batches = 0
        self.rows = 0
        self._mass = 0.0

    def step(self, x: torch.Tensor) -> None:
        """One batch of scaled rows (b, d): codes, statistics, an atom sweep, resampling."""
        codes = fista(x, self.D, self.alphas, self.iters, self.positive)  # (S, b, n)
        b = len(x)
        self.batches += 1
        self.rows += b
        weight = float(self.batches) ** self.forget
        self._mass += weight
        new = weight / self._mass  # the batch's share of the weighted mean
        self.A.mul_(1.0 - new).add_(codes.mT @ codes, alpha=new / b)
        self.B.mul_(1.0 - new).add_(codes.mT @ x, alpha=new / b)
        self._sweep()
        used = (codes != 0).any(dim=1)
        self.idle_rows = torch.where(used, 0, self.idle_rows + b)
        self._resample(x)

    def _sweep(self) -> None:
        """One Gauss-Seidel pass: each atom its exact surrogate minimiser given the others as
        they are now (the atoms before it already updated), then back onto the sphere."""
        D, A, B = self.D, self.A, self.B
        diag = A.diagonal(dim1=1, dim2=2)
        updatable = (diag > 0).unsqueeze(-1)
        inverse = 1.0 / diag.clamp_min(torch.finfo(diag.dtype).tiny)
        for k in range(D.shape[1]):
            residual = B[:, k] - torch.bmm(A[:, k : k + 1], D).squeeze(1)
            u = _unit_rows(D[:, k] + residual * inverse[:, k : k + 1])
            D[:, k] = torch.where(updatable[:, k], u, D[:, k])

    def _resample(self, x: torch.Tensor) -> None:
        # Drawn and applied every batch, dead or not: the stream of draws does not depend on the
        # data, and no host sync asks whether any atom died.
        dead = self.idle_rows >= self.resample_rows  # (S, n)
        pick = torch.randint(
            len(x), dead.shape, generator=self.generator, device=self.generator.device
        ).to(x.device)
        self.D = torch.where(dead.unsqueeze(-1), _unit_rows(x[pick]), self.D)
        keep = (~dead).to(self.A.dtype)
        self.A *= keep.unsqueeze(1) * keep.unsqueeze(2)
        self.B *= keep.unsqueeze(-1)
        self.idle_rows = torch.where(dead, 0, self.idle_rows)


def learn_dictionaries(
    batches,
    n: int,
    alphas: list[float],
    *,
    iters: int = 100,
    positive: bool = True,
    forget: float = 10.0,
    resample_rows: int = 100_000,
    seed: tuple[int, ...] = (0,),
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """(atoms (S, n, d), rows read) learnt in one pass over ``batches`` of already centred and
    scaled rows; ``seed`` keys the initialisation and the resampling draws."""
    device = torch.device(device)
    stream = iter(batches)
    head: list[torch.Tensor] = []
    held = 0
    for x in stream:  # enough rows to draw n distinct starting atoms from
        head.append(x)
        held += len(x)
        if held >= n:
            break
    if not head:
        raise ValueError("sparse coding needs at least one training row")
    init = initial_atoms(torch.cat(head), n, seeded_generator(*seed, _INIT_STREAM, device=device))
    learner = OnlineDictionaryLearner(
        init,
        alphas,
        iters=iters,
        positive=positive,
        forget=forget,
        resample_rows=resample_rows,
        generator=seeded_generator(*seed, _RESAMPLE_STREAM, device=device),
    )
    for x in head:
        learner.step(x)
    for x in stream:
        learner.step(x)
    return learner.D, learner.rows


class SparseCodingDictionary(StoredDictionary):
    """A learnt dictionary whose codes are FISTA's lasso solution (see the module docstring):

    codes = fista((x - mean) / scale, W_dec, alpha, iters, positive)
    x_hat = (codes @ W_dec) * scale + mean
    """

    arch: ClassVar[str] = "sparse-coding"

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict):
        super().__init__()
        self.d_sae, self.d_in = tensors["W_dec"].shape
        for name in ("W_dec", "mean", "scale"):
            self.register_buffer(name, tensors[name].detach().float().clone())
        # Derived from W_dec, so not saved; it moves with ``.to`` like the others.
        self.register_buffer("lipschitz", largest_eigenvalue(self.W_dec), persistent=False)
        self.config = dict(config)
        self.alpha = float(self.config["alpha"])
        self.iters = int(self.config["iters"])
        self.positive = bool(self.config.get("positive", True))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.d_in).to(self.W_dec.dtype)
        scaled = (flat - self.mean) / self.scale
        codes = fista(
            scaled, self.W_dec, self.alpha, self.iters, self.positive, lipschitz=self.lipschitz
        )
        return codes.reshape(*x.shape[:-1], self.d_sae).to(x.dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.to(self.W_dec.dtype) @ self.W_dec) * self.scale + self.mean

    def atoms(self) -> torch.Tensor:
        return self.W_dec

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"W_dec": self.W_dec, "mean": self.mean, "scale": self.scale}


def fit_sparse_coding(data, config: SAETrainConfig, n: int) -> dict[float, SparseCodingDictionary]:
    """One dictionary of n atoms per alpha in ``config.sparsity``, all from one pass over the
    budget."""
    opts = config.sparse_coding
    mean64, cov = data.moments()
    scale64 = torch.sqrt(torch.trace(cov).clamp_min(0.0))
    if float(scale64) <= 0:
        raise ValueError("the training rows are all equal: sparse coding has nothing to fit")
    mean, scale = mean64.float(), scale64.float()
    alphas = [float(a) for a in config.sparsity]
    atoms, rows = learn_dictionaries(
        (
            (x - mean) / scale
            for x in data.bar(
                data.stream(), total=config.steps, desc=f"sparse-coding n={n}", unit="batch"
            )
        ),
        n,
        alphas,
        iters=opts.iters,
        positive=opts.positive,
        forget=opts.forget,
        resample_rows=opts.resample_rows,
        seed=(config.seed, n),
        device=data.device,
    )
    out = {}
    for s, alpha in enumerate(config.sparsity):
        meta = {
            "alpha": alphas[s],
            "iters": opts.iters,
            "positive": opts.positive,
            "forget": opts.forget,
            "resample_rows": opts.resample_rows,
            "fit_rows": rows,
        }
        tensors = {"W_dec": atoms[s].contiguous(), "mean": mean, "scale": scale}
        out[alpha] = SparseCodingDictionary(tensors, meta)
    return out


SPARSE_CODING = register(
    Family(
        name="sparse-coding",
        knob=L1,
        dictionary=SparseCodingDictionary,
        source="Olshausen & Field 1996; online dictionary learning, Mairal et al. 2009; FISTA, "
        "Beck & Teboulle 2009 (peer: scikit-learn's MiniBatchDictionaryLearning)",
        fit=fit_sparse_coding,
        options=(SparseCodingOptions,),
        # on data scaled to unit mean squared norm: the useful range on toy data (0.03-0.2);
        # relu's L1 grid (another scale) would give nearly dense codes
        default_values=(0.05, 0.1, 0.2),
        saelens_refusal="its codes come from FISTA's iterations, not from one encoder layer "
        "SAELens could compute",
    )
)
