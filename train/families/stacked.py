"""The default way to train S dictionaries of one size at once: stacked parameters and autograd.

Layout, for S dictionaries (one per value of the family's sparsity knob) of n latents on d-wide
inputs:
  W_enc (d, S*n)   all encoders side by side, so the encoder is ONE GEMM: x @ W_enc -> (B, S*n)
  b_enc (S*n,)
  W_dec (S, n, d)  raw decoder rows; every forward pass uses their unit-norm version
  b_dec (S, d)     the decoder bias, also subtracted from the input before encoding
                   (absent for the report's ReLU SAE)
plus whatever an architecture adds (a JumpReLU's thresholds). The S dictionaries share no
parameter, so the gradient of the summed loss is each one's own gradient and one Adam over the
stacked tensors is S independent Adams (Adam is elementwise).

A subclass is an architecture: how pre-activations become codes in training and at inference
(``codes``), and what its loss adds to the reconstruction (``extra_loss``). Everything else —
statistics, dead-latent counters, checkpoint state, the saved dictionary — lives here, named.

Devices and ranks: every tensor a step touches lives on the group's device and a step never
reads a value on the host. A group never talks to other ranks: ``forward_backward`` returns the
per-step tensors that must be combined across ranks (``Reductions``), the trainer combines them
when the batch is split over ranks, and hands them back to ``finish_step``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from unsuperpose.train.codes import firing_counts
from unsuperpose.train.init import init_params

# name -> (tensor, how ranks combine it: "sum" or "min"); combined in place by the trainer.
Reductions = dict[str, tuple[torch.Tensor, str]]
STATS = ("sq", "l1", "l0")  # summed over rows: squared error, sum of codes, active codes


class StackedGroup:
    """All knob values of one dictionary size of one architecture, trained by autograd."""

    arch: ClassVar[str]
    decoder_bias: ClassVar[bool] = True

    def __init__(
        self,
        d: int,
        n: int,
        values: list[float],
        config,
        *,
        seed: int = 0,
        data: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ):
        self.d, self.n, self.S = d, n, len(values)
        self.values = list(values)
        self.config = config
        self.device = torch.device(device)
        self.tied = bool(getattr(config, "tied", False))
        p = init_params(
            d,
            n,
            seed=seed,
            decoder_init=config.decoder_init,
            encoder_init=config.encoder_init,
            tied=self.tied,
            data=None if data is None else data.cpu(),
        )
        p = {k: v.to(self.device) for k, v in p.items()}
        S = self.S
        self.W_dec = p["W_dec"].unsqueeze(0).repeat(S, 1, 1).contiguous()
        self.b_enc = p["b_enc"].repeat(S).contiguous()
        self.W_enc = None if self.tied else p["W_enc"].repeat(1, S).contiguous()
        self.b_dec = torch.zeros(S, d, device=self.device) if self.decoder_bias else None
        self.extra = self.init_extra()
        self._scratch: dict[str, torch.Tensor] = {}  # see scratch()
        for t in self.parameters():
            t.grad = torch.zeros_like(t)
        # Steps since each latent last fired; int64 so it cannot overflow on long runs.
        self.since_fired = torch.zeros(S, n, dtype=torch.int64, device=self.device)
        self.buffers = self.init_buffers()
        self.reset_stats()

    # -- what an architecture defines ---------------------------------------------------------
    def init_extra(self) -> dict[str, torch.Tensor]:
        """Parameters beyond the shared four, named; stacked over the S dictionaries."""
        return {}

    def init_buffers(self) -> dict[str, torch.Tensor]:
        """State that is not trained by the optimiser but must survive a checkpoint."""
        return {}

    def codes(self, pre: torch.Tensor, training: bool) -> torch.Tensor:
        """(B, S, n) pre-activations -> codes; ``training``: inside a step (batch-level rules
        may apply there that a saved dictionary cannot use)."""
        raise NotImplementedError

    def recon_loss(self, err: torch.Tensor) -> torch.Tensor:
        """(S,) from err (S, B, d): the mean over the batch of the squared error summed over
        the d coordinates, as the TopK, JumpReLU and Matryoshka papers and SAELens write it."""
        return err.pow(2).sum(-1).mean(-1)

    def extra_loss(self, x, pre, codes, x_hat, err, dn) -> torch.Tensor:
        """(S,) what each dictionary's loss adds to its reconstruction loss."""
        return torch.zeros(self.S, device=self.device)

    def step_reductions(self) -> Reductions:
        """Per-step tensors beyond the firing counts that ranks must combine."""
        return {}

    def after_step(self, reduced: Reductions, step: int) -> None:
        """Update buffers from the step's (combined) reductions."""

    def dictionary_tensors(self, s: int, dn: torch.Tensor) -> dict[str, torch.Tensor]:
        """Effective tensors of dictionary ``s`` in its saved class's layout."""
        t = {
            "W_enc": self.encoder_weight(dn).view(self.d, self.S, self.n)[:, s].contiguous(),
            "b_enc": self.b_enc.view(self.S, self.n)[s].clone(),
            "W_dec": dn[s].contiguous(),
        }
        if self.b_dec is not None:
            t["b_dec"] = self.b_dec[s].clone()
        return t

    def dictionary_config(self, s: int) -> dict:
        """What the saved dictionary needs beyond its tensors (e.g. its k)."""
        return {}

    dictionary_class: ClassVar[type]

    # -- parameters and state -----------------------------------------------------------------
    def named_parameters(self) -> dict[str, torch.Tensor]:
        named = {"b_enc": self.b_enc, "W_dec": self.W_dec}
        if self.W_enc is not None:
            named["W_enc"] = self.W_enc
        if self.b_dec is not None:
            named["b_dec"] = self.b_dec
        named.update(self.extra)
        return named

    def parameters(self) -> list[torch.Tensor]:
        return list(self.named_parameters().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{k: v.detach().clone() for k, v in self.named_parameters().items()},
            "since_fired": self.since_fired.clone(),
            **{k: v.clone() for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copies into this group's tensors, so a checkpoint from any device loads on this one."""
        mine = {**self.named_parameters(), "since_fired": self.since_fired, **self.buffers}
        missing = sorted(set(mine) - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks {missing} for the {self.arch} group of {self.n}")
        with torch.no_grad():
            for name, t in mine.items():
                if state[name].shape != t.shape:
                    raise ValueError(
                        f"checkpoint {name} has shape {tuple(state[name].shape)}, "
                        f"expected {tuple(t.shape)}"
                    )
                t.copy_(state[name])

    # -- views --------------------------------------------------------------------------------
    def dictionaries(self) -> torch.Tensor:
        """Unit-norm atoms of every dictionary, (S, n, d)."""
        with torch.no_grad():
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)

    def scratch(
        self,
        name: str,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype | None = None,
        fill: Callable[[torch.Tensor], object] | None = None,
    ) -> torch.Tensor:
        """A work tensor of the hand-written steps, kept across steps under ``name`` and made anew
        only when its shape or dtype (default: the parameters') changes, when ``fill`` writes
        its contents once; otherwise it holds whatever the last step left. A fresh tensor of a
        decoder's size page-faults on every step (a fresh W_dec / norms took 19 ms at
        8,192 x 1,024 against 3.7 ms into a kept one)."""
        dtype = self.W_dec.dtype if dtype is None else dtype
        t = self._scratch.get(name)
        if t is None or t.shape != tuple(shape) or t.dtype != dtype:
            t = self._scratch[name] = torch.empty(shape, dtype=dtype, device=self.device)
            if fill is not None:
                fill(t)
        return t

    @torch.no_grad()
    def unit_decoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(norms (S, n, 1), W_dec / norms (S, n, d)) for a hand-written step, the atoms in a
        ``scratch`` tensor: valid until the next call."""
        norms = self.W_dec.norm(dim=-1, keepdim=True)
        atoms = self.scratch("unit_decoder", self.W_dec.shape)
        return norms, torch.div(self.W_dec, norms, out=atoms)

    @torch.no_grad()
    def write_decoder_grad(self, d_dn: torch.Tensor, dn: torch.Tensor, norms: torch.Tensor) -> None:
        """W_dec.grad from d_dn (S, n, d) = dL/d(W_dec / ||W_dec||), overwritten: through the
        normalisation that is (d_dn - dn <d_dn, dn>) / ||W_dec||, row by row."""
        radial = torch.mul(d_dn, dn, out=self.scratch("row_dots", dn.shape)).sum(-1, keepdim=True)
        torch.div(d_dn.addcmul_(dn, radial, value=-1), norms, out=self.W_dec.grad)

    def encoder_weight(self, dn: torch.Tensor | None = None) -> torch.Tensor:
        """(d, S*n): the untied encoders, or the tied ones built from the normalised decoders."""
        if not self.tied:
            return self.W_enc
        dn = self.dictionaries() if dn is None else dn
        return dn.permute(2, 0, 1).reshape(self.d, self.S * self.n)

    def pre_activations(self, x: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        """(B, S, n); with a decoder bias, (x - b_dec_s) @ W_enc_s + b_enc_s for every s."""
        w = self.encoder_weight(dn)
        pre = torch.addmm(self.b_enc, x, w).view(len(x), self.S, self.n)
        if self.b_dec is not None:
            shift = torch.einsum("sd,dsn->sn", self.b_dec, w.view(self.d, self.S, self.n))
            pre = pre - shift
        return pre

    def decode(self, codes: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        """(B, S, n) codes -> (S, B, d) reconstructions."""
        x_hat = torch.bmm(codes.transpose(0, 1), dn)
        if self.b_dec is not None:
            x_hat = x_hat + self.b_dec.unsqueeze(1)
        return x_hat

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, dn: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (B, S, n) and reconstructions (S, B, d) as the saved dictionaries compute them."""
        dn = self.dictionaries() if dn is None else dn
        codes = self.codes(self.pre_activations(x, dn), training=False)
        return codes, self.decode(codes, dn)

    def sae_params(self, s: int) -> dict[str, torch.Tensor]:
        """Effective tensors of dictionary ``s`` (unit decoder rows, explicit encoder)."""
        with torch.no_grad():
            return self.dictionary_tensors(s, self.dictionaries())

    def dictionary(self, s: int):
        """Dictionary ``s`` as the class it is saved and loaded as (its effective weights)."""
        with torch.no_grad():
            tensors = self.dictionary_tensors(s, self.dictionaries())
        return self.dictionary_class(tensors, {"arch": self.arch, **self.dictionary_config(s)})

    # -- a training step ----------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor) -> Reductions:
        """Gradients of every dictionary's loss on batch ``x`` into ``.grad``; statistics.

        Loss of dictionary s: ``recon_loss`` + ``extra_loss``.
        """
        # Parameters require grad only inside this step: everywhere else (resampling, loading a
        # checkpoint, the post-step projection) they are edited in place like plain tensors.
        params = self.parameters()
        for t in params:
            t.grad = None
            t.requires_grad_(True)
        with torch.enable_grad():
            norms = self.W_dec.norm(dim=-1, keepdim=True)
            dn = self.W_dec / norms
            pre = self.pre_activations(x, dn)
            codes = self.codes(pre, training=True)
            x_hat = self.decode(codes, dn)
            err = x_hat - x
            loss = self.recon_loss(err) + self.extra_loss(x, pre, codes, x_hat, err, dn)
            loss.sum().backward()
        with torch.no_grad():
            codes = codes.detach()
            fired = firing_counts(codes)
            self.count_stats(codes, err.detach(), fired, len(x))
        for t in params:
            t.requires_grad_(False)
            if t.grad is None:  # a parameter the loss did not reach still has a gradient
                t.grad = torch.zeros_like(t)
        return {"fired": (fired, "sum"), **self.step_reductions()}

    def count_stats(
        self, codes: torch.Tensor, err: torch.Tensor, fired: torch.Tensor, rows: int
    ) -> None:
        """codes (B, S, n), err (S, B, d), fired (S, n) of this rank's rows."""
        self.stats[0] += torch.linalg.vector_norm(err, dim=(1, 2)).square()
        self.stats[1] += codes.sum(dim=(0, 2))
        self.stats[2] += fired.sum(dim=1)
        self.stat_rows += rows

    def finish_step(self, reduced: Reductions, step: int) -> None:
        """After the ranks combined the reductions of step ``step`` (counted from 1), or alone:
        dead counters and buffers."""
        fired = reduced["fired"][0]
        self.since_fired.add_(1).masked_fill_(fired > 0, 0)
        self.after_step(reduced, step)

    @torch.no_grad()
    def post_step(self) -> None:
        """After every optimiser step: raw decoder rows back to unit norm.

        The loss only sees W_dec / ||W_dec||, so the gradient is tangent to the sphere and the
        raw norms grow under Adam (max 1.27 after 1,500 steps at h 32). Adam's step is ~lr in
        raw coordinates, i.e. lr / ||W_row|| on the sphere: grown atoms would learn slower than
        freshly resampled ones (norm 1). Projecting back keeps every atom's step at lr and
        leaves the function the dictionary computes unchanged.
        """
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True))

    def reset_stats(self) -> None:
        # float64 on the device: a sum over thousands of steps; read on the host at log steps only.
        self.stats = torch.zeros(len(STATS), self.S, dtype=torch.float64, device=self.device)
        self.stat_rows = 0

    def dead_mask(self, window: int, steps_done: int) -> torch.Tensor:
        """(S, n) bool: latents silent for the last ``window`` batches (or all of a shorter run)."""
        return self.since_fired >= min(window, max(steps_done, 1))

    @torch.no_grad()
    def nonfinite(self) -> torch.Tensor:
        """(S,) True where a dictionary's weights hold a NaN or Inf."""
        S, n, d = self.S, self.n, self.d
        bad = ~torch.isfinite(self.W_dec).flatten(1).all(dim=1)
        bad |= ~torch.isfinite(self.b_enc).view(S, n).all(dim=1)
        if self.W_enc is not None:
            bad |= ~torch.isfinite(self.W_enc).view(d, S, n).all(dim=2).all(dim=0)
        if self.b_dec is not None:
            bad |= ~torch.isfinite(self.b_dec).all(dim=1)
        for t in self.extra.values():
            bad |= ~torch.isfinite(t).view(S, -1).all(dim=1)
        return bad
