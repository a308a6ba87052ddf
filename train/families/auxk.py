"""AuxK, the auxiliary loss that revives dead latents (Gao et al. 2024, appendix A.2), shared by
the topk, batchtopk and matryoshka families.

A latent is dead for AuxK when it has not fired for ``dead_tokens`` rows:
``since_fired * batch_size >= dead_tokens`` (``auxk.dead_tokens`` 0: the run's
``dead_window * batch_size``, the window the dead-latent diagnostic reads). Each row's top
``k_aux`` dead latents (``auxk.k_aux`` 0: d_in // 2, sparsify's heuristic; at most the number of
dead latents, automatically, since live latents enter with value 0) take ReLU(pre) as codes and
reconstruct, with the unit decoder rows and no bias, the residual the live latents left:

    e     = (x - x_hat).detach()                       x_hat: the dictionary's reconstruction
    e_hat = aux_codes @ dn
    L_aux = coef * min(n_dead / k_aux, 1) * sum((e_hat - e)^2) / sum((e - mean_batch(e))^2)

summed over the batch's rows and the d coordinates, per dictionary. ``coef`` defaults to 1/32
(Gao et al.); the normalisation by the residual's variance is OpenAI's ``normalized_mse`` (as
dictionary_learning copies it; sparsify divides by the input's variance instead); the scale
min(n_dead / k_aux, 1) is sparsify's (neither OpenAI nor dictionary_learning has it). The loss is
0 where no latent is dead, where ``coef`` is 0, and where the residual has no variance (a batch
of one row; sparsify and dictionary_learning would divide by zero there).

Deviations: Gao et al. call a latent dead after 10M tokens without firing and use k_aux = 512;
our defaults scale with the run (``dead_window`` batches, d_in // 2). Under data parallelism each
rank normalises by its own rows' residual variance (the trainer averages the gradients).
The loss is computed every step, dead latents or not (a step never reads a device value on the
host, so it cannot skip the work when nothing is dead).
"""

from __future__ import annotations

import torch


def dead_for_auxk(group) -> torch.Tensor:
    """(S, n) bool: latents that have not fired for ``auxk.dead_tokens`` rows."""
    cfg = group.config
    dead_tokens = cfg.auxk.dead_tokens or cfg.dead_window * cfg.batch_size
    return group.since_fired * cfg.batch_size >= dead_tokens


def auxk_k(group) -> int:
    """The configured k_aux (0: d_in // 2, at least 1)."""
    return group.config.auxk.k_aux or max(group.d // 2, 1)


def auxk_loss(group, pre: torch.Tensor, err: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
    """(S,) AuxK loss of every dictionary of ``group``.

    pre (B, S, n) pre-activations, err (S, B, d) = x_hat - x of the full reconstruction,
    dn (S, n, d) unit decoder rows.
    """
    coef = group.config.auxk.coef
    if coef == 0:
        return torch.zeros(group.S, device=pre.device)
    k_aux = auxk_k(group)
    dead = dead_for_auxk(group)
    scale = (dead.sum(dim=1).float() / k_aux).clamp(max=1.0)  # 0 where nothing is dead
    candidates = torch.relu(pre) * dead  # live latents enter as 0 and never contribute
    vals, idx = candidates.topk(min(k_aux, group.n), dim=-1, sorted=False)
    aux_codes = torch.zeros_like(candidates).scatter(-1, idx, vals)
    e_hat = torch.bmm(aux_codes.transpose(0, 1), dn)  # (S, B, d), no decoder bias
    e = -err.detach()
    num = (e_hat - e).pow(2).sum(dim=(1, 2))
    denom = (e - e.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
    ok = denom > 0
    # Dividing by 1 where the variance is 0 keeps the masked branch's gradient finite (0, not NaN).
    return coef * scale * ok * num / torch.where(ok, denom, torch.ones_like(denom))
