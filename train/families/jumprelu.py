"""``jumprelu``: an SAE whose latents fire above a learnt per-latent threshold, trained on L0.

Rajamanoharan et al. (2024), "Jumping ahead: improving reconstruction fidelity with JumpReLU
sparse autoencoders" (arXiv 2407.14435); peers: SAELens's JumpReLU training SAE and
dictionary_learning's ``JumpReluTrainer``. Our code, written from the paper's definitions.

Definition, for dictionary s (knob value ``l0_coef`` = lambda_s):
  pre   = (x - b_dec) @ W_enc + b_enc                        (B, n)
  theta = exp(log_threshold)      per latent, trained; starts at ``jumprelu.init_threshold``
  codes = pre * H(pre - theta)    H the Heaviside step (fires strictly above theta)
  x_hat = codes @ W_dec + b_dec   W_dec rows of unit norm
  loss  = mean_batch ||x - x_hat||^2 (summed over the d coordinates)
          + lambda_s * mean_batch sum_i H(pre_i - theta_i)   (the batch's mean L0)
H has no useful derivative, so both uses of it are trained through straight-through
estimators with the rectangle kernel K(u) = 1{|u| < 1/2} of bandwidth eps
(``jumprelu.bandwidth``):
  JumpReLU: d codes / d pre = H(pre - theta)                   (the exact derivative off the jump)
            d codes / d theta = -(theta / eps) K((pre - theta) / eps)
  step:     d H / d pre = 0,   d H / d theta = -(1 / eps) K((pre - theta) / eps)
so the threshold learns from both terms (the reconstruction pulls it down where a code near it
helps; the L0 term's gradient, -lambda_s / eps times the fraction of rows whose pre-activation
lies within eps / 2 of theta, pushes it up), while the encoder learns from the reconstruction
alone, as in the paper. theta is kept positive by training its log (as SAELens does;
dictionary_learning trains theta itself); d/d log theta = theta * d/d theta, which autograd
adds through the ``exp``.

Defaults (``SAETrainConfig.jumprelu``): eps = 0.001 and theta_0 = 0.001, the paper's values.

Deviations from the paper:
- No rescaling of the data. The paper trains on activations multiplied by one fixed scalar
  (Gemma Scope, its companion, §3.1: unit mean squared norm, E||x||^2 = 1; Anthropic's recipe
  instead scales to E||x||^2 = d), and its eps, theta_0 and lambda are tuned at that scale. We
  train on the source's own scale, so all three are in the data's units: scaling x by c scales
  pre and the right theta by c (so eps and theta_0 should scale by c) and the reconstruction
  loss by c^2 (so lambda should scale by c^2 for the same trade-off, L0 being scale-free). Toy
  data (k unit features with U(0, 1) coefficients) has E||x||^2 ~ k / 3, near the paper's
  scale; raw LM activations are far from it, so eps, theta_0 and lambda must be set for them.
  Even at the paper's scale a short run barely moves theta from the defaults: only rows whose
  pre-activation lies within eps / 2 of theta give it a gradient, and the encoder gets none from
  the L0 term to bring them there (the paper trains for billions of tokens). Measured on toy
  data (h 32, G 64, k 3, 64 latents, 3,000 steps of 128 rows, lr 3e-3): at eps = theta_0 =
  1e-3 theta stayed ~1e-3 and L0 ~54 for every lambda in 0..0.03; at eps = theta_0 = 0.05 L0
  went 32, 22, 4.9, 2.3 for lambda 0, 1e-3, 1e-2, 3e-2.
- Decoder rows of unit norm: every forward pass uses W_dec / ||W_dec|| and the base renormalises
  the raw rows after every step (``StackedGroup.post_step``). The forward normalisation makes the
  gradient tangent to the sphere, which is what the peers get by removing the gradient's
  component along each row before renormalising. (L0 does not depend on decoder norms, so the
  paper needs no norm in its penalty; the constraint only fixes the scale between encoder and
  decoder.)
- The run's own optimiser and schedule, shared by every architecture: Adam with
  ``lr``/``beta1``/``beta2`` from the config, constant, no warm-up. The paper uses Adam with
  beta1 = 0 and warms up the learning rate and lambda (dictionary_learning's trainer also clips
  the gradient norm); none of that is here.
- Initialisation is the project's (``train.init``: orthogonal or data decoder, encoder its
  transpose, zero biases) and the same for every architecture; the paper also starts the encoder
  at the decoder's transpose and the biases at zero.

Saved as ``JumpReLUSAE``: the affine SAE's four tensors plus ``threshold`` (theta itself, not its
log), encode = pre * (pre > threshold), the layout of SAELens's JumpReLU SAE.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from unsuperpose.train.config import JumpReLUOptions
from unsuperpose.train.dictionary import AffineSAE
from unsuperpose.train.families.stacked import StackedGroup
from unsuperpose.train.knobs import L0_COEF
from unsuperpose.train.registry import Family, SAELens, register


class JumpReLUSAE(AffineSAE):
    """codes = pre * (pre > threshold), one threshold per latent."""

    arch = "jumprelu"
    extra_tensors: ClassVar[tuple[str, ...]] = ("threshold",)

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1{|u| < 1/2}, in u's dtype."""
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sums a (B, S, n) gradient over the leading dimensions theta (S, n) was broadcast along."""
    return grad.sum(dim=tuple(range(grad.dim() - like.dim())))


class JumpReLUFunction(torch.autograd.Function):
    """pre * H(pre - theta) with the paper's straight-through gradients; theta broadcasts over
    pre's leading dimensions ((B, S, n) against (S, n))."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            kernel = _rectangle((pre - theta) / eps)
            grad_theta = _sum_to(-(theta / eps) * kernel * grad, theta)
        return grad_pre, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(pre - theta) with the paper's straight-through gradient for theta (none for pre)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = None
        if ctx.needs_input_grad[1]:
            kernel = _rectangle((pre - theta) / eps)
            grad_theta = _sum_to(-(1.0 / eps) * kernel * grad, theta)
        return None, grad_theta, None  # None: no gradient for pre (zero), none allocated


class JumpReLUGroup(StackedGroup):
    """S JumpReLU SAEs of n latents, one per L0 coefficient, trained by autograd."""

    arch = "jumprelu"
    decoder_bias = True
    dictionary_class = JumpReLUSAE

    def init_extra(self) -> dict[str, torch.Tensor]:
        opts = self.config.jumprelu
        if not opts.bandwidth > 0 or not opts.init_threshold > 0:
            raise ValueError(
                "jumprelu needs bandwidth > 0 and init_threshold > 0 "
                f"(got {opts.bandwidth} and {opts.init_threshold})"
            )
        self.bandwidth = float(opts.bandwidth)
        self.l0_coef = torch.tensor(self.values, dtype=torch.float32, device=self.device)
        log_threshold = torch.full(
            (self.S * self.n,), math.log(opts.init_threshold), device=self.device
        )
        return {"log_threshold": log_threshold}

    def threshold(self) -> torch.Tensor:
        """(S, n) theta = exp(log_threshold); differentiable."""
        return self.extra["log_threshold"].view(self.S, self.n).exp()

    def codes(self, pre: torch.Tensor, training: bool) -> torch.Tensor:
        if training:
            return JumpReLUFunction.apply(pre, self.threshold(), self.bandwidth)
        theta = self.threshold().detach()
        return pre * (pre > theta)

    def extra_loss(self, x, pre, codes, x_hat, err, dn) -> torch.Tensor:
        fires = StepFunction.apply(pre, self.threshold(), self.bandwidth)  # (B, S, n)
        return self.l0_coef * fires.sum(-1).mean(0)

    def dictionary_tensors(self, s: int, dn: torch.Tensor) -> dict[str, torch.Tensor]:
        t = super().dictionary_tensors(s, dn)
        t["threshold"] = self.threshold().detach()[s].clone()
        return t


JUMPRELU = register(
    Family(
        name="jumprelu",
        dictionary=JumpReLUSAE,
        knob=L0_COEF,
        group=JumpReLUGroup,
        options=(JumpReLUOptions,),
        saelens=SAELens("jumprelu"),
        source=(
            "Rajamanoharan et al. 2024, 'Jumping ahead: improving reconstruction fidelity with "
            "JumpReLU sparse autoencoders'; peers: SAELens's JumpReLU training SAE, "
            "dictionary_learning's JumpReluTrainer"
        ),
    )
)
