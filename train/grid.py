"""S SAEs of one dictionary size, trained as one: stacked parameters and a hand-written backward.

Layout, for S SAEs (one per L1 value) of n latents on d-wide inputs and a batch of B:
  W_enc (d, S*n)   all encoders side by side, so the encoder is ONE GEMM: x @ W_enc -> (B, S*n)
  b_enc (S*n,)
  W_dec (S, n, d)  raw decoder rows; the forward pass uses their unit-norm version
The decoder products are batched GEMMs over S. The gradients are derived by hand (checked
against autograd in the tests): autograd would keep more intermediates alive and add per-op
overhead that dominates at toy sizes.

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

Data parallel (one grid too big for one device, ``data_parallel=True`` under torchrun): every rank
holds every SAE and computes gradients on its own slice of the batch; the trainer averages them
across ranks, and the latents' firing counts and the statistics are summed across ranks here, so
dead counters and logged means are those of the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from unsuperpose.train import sparse
from unsuperpose.train.init import init_params
from unsuperpose.train.losses import l1_divisor


class SAEGroup:
    """All L1 values of one dictionary size; exposes parameters for a shared optimizer."""

    def __init__(
        self,
        d: int,
        n: int,
        l1: list[float],
        *,
        l1_norm: str = "sum",
        tied: bool = False,
        seed: int = 0,
        decoder_init: str = "orthogonal",
        encoder_init: str = "transpose",
        data: torch.Tensor | None = None,
        sparse_below: float = 0.0,
        device: torch.device | str = "cpu",
        data_parallel: bool = False,
    ):
        self.d, self.n, self.S, self.tied = d, n, len(l1), tied
        self.device = torch.device(device)
        self.data_parallel = data_parallel
        self.sparse_below = sparse_below if self.device.type == "cpu" else 0.0
        self.sparse_steps = 0
        self.l1 = list(l1)
        p = init_params(
            d,
            n,
            seed=seed,
            decoder_init=decoder_init,
            encoder_init=encoder_init,
            tied=tied,
            data=None if data is None else data.cpu(),
        )
        p = {k: v.to(self.device) for k, v in p.items()}
        S = self.S
        self.W_dec = p["W_dec"].unsqueeze(0).repeat(S, 1, 1).contiguous()
        self.b_enc = p["b_enc"].repeat(S).contiguous()
        self.W_enc = None if tied else p["W_enc"].repeat(1, S).contiguous()
        self.l1_coef = (torch.tensor(l1, dtype=torch.float32) / l1_divisor(l1_norm, n)).to(
            self.device
        )
        for t in self.parameters():
            t.grad = torch.zeros_like(t)
        # Steps since each latent last fired; int64 so it cannot overflow on long runs.
        self.since_fired = torch.zeros(S, n, dtype=torch.int64, device=self.device)
        self._buf: dict[str, torch.Tensor] | None = None
        self._zero = torch.zeros((), device=self.device)
        self.reset_stats()

    def parameters(self) -> list[torch.Tensor]:
        return [t for t in (self.W_enc, self.b_enc, self.W_dec) if t is not None]

    def named_parameters(self) -> dict[str, torch.Tensor]:
        named = {"b_enc": self.b_enc, "W_dec": self.W_dec}
        if self.W_enc is not None:
            named["W_enc"] = self.W_enc
        return named

    # -- views of one SAE -----------------------------------------------------------------------
    def dictionaries(self) -> torch.Tensor:
        """Unit-norm atoms of every SAE, (S, n, d)."""
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)

    def encoder_weight(self, dn: torch.Tensor | None = None) -> torch.Tensor:
        """(d, S*n): the untied encoders, or the tied ones built from the normalised decoders."""
        if not self.tied:
            return self.W_enc
        dn = self.dictionaries() if dn is None else dn
        return dn.permute(2, 0, 1).reshape(self.d, self.S * self.n)

    def sae_params(self, s: int) -> dict[str, torch.Tensor]:
        """Effective weights of SAE ``s`` in the layout of ``unsuperpose.train.SAE``."""
        dn = self.dictionaries()
        w_enc = self.encoder_weight(dn).view(self.d, self.S, self.n)[:, s]
        return {
            "W_enc": w_enc.contiguous(),
            "b_enc": self.b_enc.view(self.S, self.n)[s].clone(),
            "W_dec": dn[s].contiguous(),
        }

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, dn: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (B, S, n) and reconstructions (S, B, d) of every SAE; no training buffers used."""
        dn = self.dictionaries() if dn is None else dn
        codes = (
            torch.addmm(self.b_enc, x, self.encoder_weight(dn))
            .clamp_(min=0)
            .view(len(x), self.S, self.n)
        )
        return codes, torch.bmm(codes.transpose(0, 1), dn)

    # -- training ---------------------------------------------------------------------------------
    @torch.no_grad()
    def renormalise_(self) -> None:
        """Raw decoder rows back to unit norm, after every optimiser step.

        The loss only sees W_dec / ||W_dec||, so the gradient is tangent to the sphere and the
        raw norms grow under Adam (max 1.27 after 1,500 steps at h 32). Adam's step is ~lr in
        raw coordinates, i.e. lr / ||W_row|| on the sphere: grown atoms would learn slower than
        freshly resampled ones (norm 1). Projecting back keeps every atom's step at lr and
        leaves the function the SAE computes unchanged.
        """
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True))

    def reset_stats(self) -> None:
        # float64 on the device: a sum over thousands of steps; read on the host at log steps only.
        self.stat_sq = torch.zeros(self.S, dtype=torch.float64, device=self.device)
        self.stat_l1 = torch.zeros(self.S, dtype=torch.float64, device=self.device)
        self.stat_l0 = torch.zeros(self.S, dtype=torch.float64, device=self.device)
        self.stat_rows = 0

    def _buffers(self, B: int) -> dict[str, torch.Tensor]:
        """Work tensors reused across steps: fresh allocations this size page-fault every step."""
        if self._buf is None or self._buf["pre"].shape[0] != B:
            S, n, d = self.S, self.n, self.d
            shapes = {
                "pre": (B, S * n),
                "dpre": (B, S * n),
                "err": (S, B, d),
                "dc": (S, B, n),
                "d_dn": (S, n, d),
                "d_w_enc": (d, S * n),
            }
            self._buf = {k: torch.empty(v, device=self.device) for k, v in shapes.items()}
        return self._buf

    @torch.no_grad()
    def forward_backward(self, x: torch.Tensor) -> None:
        """Gradients of every SAE's loss on batch ``x`` into ``.grad``; stats and dead counters."""
        B, d = x.shape
        S, n = self.S, self.n
        buf = self._buffers(B)
        norms = self.W_dec.norm(dim=-1, keepdim=True)
        dn = self.W_dec / norms
        w_enc = self.encoder_weight(dn)

        codes = torch.addmm(self.b_enc, x, w_enc, out=buf["pre"]).clamp_(min=0)  # (B, S*n)
        codes3 = codes.view(B, S, n)
        codes_s = codes3.transpose(0, 1)  # (S, B, n) view
        fired = torch.count_nonzero(codes3, dim=0)  # (S, n)
        self.stat_l0 += fired.sum(dim=1)  # this slice's; take_stats sums the ranks
        # Decided per step from this step's own codes: the sparse kernels pay off only when few
        # codes are active, which is true late in training and false at the start. The count is
        # read on the host only when the sparse path is possible at all (CPU).
        use_sparse = self.sparse_below > 0 and int(fired.sum()) < self.sparse_below * B * S * n
        if self.data_parallel:  # a latent is alive if it fired on any rank's slice
            dist.all_reduce(fired)
        if use_sparse:
            self.sparse_steps += 1
            pairs = [sparse.to_csr_pair(codes3[:, s].contiguous()) for s in range(S)]
            err = buf["err"]
            for s in range(S):
                err[s] = sparse.decode(pairs[s], dn[s])
            err.sub_(x)
        else:
            err = torch.bmm(codes_s, dn, out=buf["err"]).sub_(x)  # (S, B, d)

        self.stat_l1 += codes3.sum(dim=(0, 2))
        self.stat_sq += torch.linalg.vector_norm(err, dim=(1, 2)).square_()
        self.stat_rows += B
        self.since_fired.add_(1).masked_fill_(fired > 0, 0)

        g = err.mul_(2.0 / (B * d))
        d_dn = buf["d_dn"]
        d_w_enc = buf["d_w_enc"]
        if use_sparse:
            l1_grad = (self.l1_coef / B).tolist()
            for s in range(S):
                cols = slice(s * n, (s + 1) * n)
                d_dn[s], d_w_enc[:, cols], self.b_enc.grad[cols] = sparse.backward(
                    pairs[s], g[s], dn[s], x, l1_grad[s]
                )
        else:
            torch.bmm(codes_s.transpose(1, 2), g, out=d_dn)  # (S, n, d)
            dc = torch.bmm(g, dn.transpose(1, 2), out=buf["dc"])  # (S, B, n)
            dc.add_((self.l1_coef / B).view(S, 1, 1))
            dpre = buf["dpre"]
            torch.where(codes3 > 0, dc.transpose(0, 1), self._zero, out=dpre.view(B, S, n))
            torch.mm(x.T, dpre, out=d_w_enc)  # (d, S*n)
            torch.sum(dpre, dim=0, out=self.b_enc.grad)
        if self.tied:
            d_dn += d_w_enc.view(d, S, n).permute(1, 2, 0)
        else:
            self.W_enc.grad.copy_(d_w_enc)
        radial = (d_dn * dn).sum(dim=-1, keepdim=True)
        torch.div(d_dn.sub_(dn * radial), norms, out=self.W_dec.grad)

    def take_stats(self) -> dict[str, torch.Tensor]:
        """Means since the last call, per SAE: mse, l1 (sum of codes per row), l0."""
        rows = self.stat_rows
        if self.data_parallel:
            stats = torch.stack([self.stat_sq, self.stat_l1, self.stat_l0])
            dist.all_reduce(stats)
            self.stat_sq, self.stat_l1, self.stat_l0 = stats
            rows *= dist.get_world_size()
        rows = max(rows, 1)
        out = {
            "mse": self.stat_sq / (rows * self.d),
            "l1": self.stat_l1 / rows,
            "l0": self.stat_l0 / rows,
        }
        self.reset_stats()
        return out

    def dead_mask(self, window: int, steps_done: int) -> torch.Tensor:
        """(S, n) bool: latents silent for the last ``window`` batches (or all of a shorter run)."""
        return self.since_fired >= min(window, max(steps_done, 1))

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{k: v.clone() for k, v in self.named_parameters().items()},
            "since_fired": self.since_fired.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copies into this group's tensors, so a checkpoint from any device loads on this one."""
        for name, t in self.named_parameters().items():
            if state[name].shape != t.shape:
                raise ValueError(
                    f"checkpoint {name} has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(t.shape)}"
                )
            t.copy_(state[name])
        self.since_fired.copy_(state["since_fired"])
