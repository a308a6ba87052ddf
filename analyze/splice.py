"""The SAE spliced into the LM: what the model's next-token predictions lose when the SAE's
reconstruction replaces the activation at its hook.

Over the same token blocks, one forward pass each:
  clean      the model as it is (its activations at the hook are captured for the SAEs)
  zero/mean  the hook's activation replaced by zeros / by its mean over the store
  sae        replaced by the SAE's reconstruction of it
Per predicted token (every position but a block's last): the cross-entropy of the true next
token, and KL(clean || spliced) of the next-token distributions. Figures are means over tokens:

  ce_loss_recovered      = (CE_zero - CE_sae) / (CE_zero - CE_clean)    SAELens's ce_loss_score,
                           taken on the means (dictionary_learning averages the ratio per batch)
  ce_loss_recovered_mean = the same against mean ablation (a harder baseline than zeros)
  delta_ce               = CE_sae - CE_clean in nats, with its standard error over tokens (paired)
  kl                     = mean KL(clean || sae);  kl_div_score = (KL_zero - KL_sae) / KL_zero
  norm_ratio             = mean over tokens of |x_hat| / |x|
  relative_reconstruction_bias = E|x_hat|^2 / E<x, x_hat>  (< 1: the codes shrink, the L1 effect)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

Reconstruct = Callable[[torch.Tensor], torch.Tensor]


class _Sums:
    """Running float64 sums over predicted tokens (and over activation rows for shrinkage)."""

    def __init__(self):
        self.ce = self.dce = self.dce_sq = self.kl = 0.0
        self.norm_ratio = self.xhat_sq = self.x_dot_xhat = 0.0
        self.rows = 0


def _ce_per_token(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted token: cross-entropy of the target, and the log-probabilities (for KL)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logp


class _Clean:
    """The clean distribution of one batch, with what every KL against it reuses: KL(p || q) =
    sum p log p - sum p log q, the first term once per batch, the second a batched dot product
    (no vocabulary-sized temporary per SAE)."""

    def __init__(self, logp: torch.Tensor):
        v = logp.shape[-1]
        self.p = logp.exp().reshape(-1, 1, v)
        self.neg_entropy = torch.bmm(self.p, logp.reshape(-1, v, 1)).reshape(logp.shape[:-1])

    def kl(self, logp: torch.Tensor) -> torch.Tensor:
        cross = torch.bmm(self.p, logp.reshape(-1, logp.shape[-1], 1)).reshape(logp.shape[:-1])
        return self.neg_entropy - cross


def _run(bridge, tokens: torch.Tensor, hook: str, fn) -> torch.Tensor:
    return bridge.run_with_hooks(tokens, fwd_hooks=[(hook, fn)])


def batches_of_blocks(blocks: list[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """Blocks of equal length batched together (a corpus's last block may be shorter)."""
    by_len: dict[int, list[np.ndarray]] = {}
    for b in blocks:
        by_len.setdefault(len(b), []).append(b)
    for _, group in sorted(by_len.items(), reverse=True):
        for i in range(0, len(group), batch_size):
            yield torch.from_numpy(np.stack(group[i : i + batch_size]).astype(np.int64))


@torch.no_grad()
def splice_eval(
    bridge,
    hook: str,
    blocks: list[np.ndarray],
    saes: dict[str, Reconstruct],
    *,
    mean: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> dict:
    """Spliced-in figures of every SAE in ``saes`` ({name: x -> x_hat}) on ``blocks`` (token id
    arrays of length >= 2), with ``bridge`` and the SAEs on ``device``. Returns {"tokens",
    "ce_clean", "ce_zero", "ce_mean", "saes": {name: {...}}}."""
    mean = mean.float().to(device)
    clean, zero, mean_abl = _Sums(), _Sums(), _Sums()
    sums = {name: _Sums() for name in saes}
    n_tokens = 0
    total = sum(len(b) - 1 for b in blocks)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="splice", disable=not progress)
    for tokens in batches_of_blocks(blocks, batch_size):
        tokens = tokens.to(device)
        captured = {}

        # _run below calls the hook within this iteration, so it sees this iteration's dict
        def capture(x, hook=None):
            captured["x"] = x.detach().clone()  # noqa: B023
            return x

        targets = tokens[:, 1:]
        logits = _run(bridge, tokens, hook, capture)
        ce_c, logp_c = _ce_per_token(logits[:, :-1], targets)
        ref = _Clean(logp_c)
        del logits, logp_c
        x = captured["x"]
        clean.ce += float(ce_c.sum(dtype=torch.float64))
        n_tokens += ce_c.numel()
        for acc, replacement in (
            (zero, torch.zeros_like(x)),
            (mean_abl, mean.to(x.dtype).expand_as(x)),
        ):
            ce, logp = _ce_per_token(
                _run(bridge, tokens, hook, lambda a, hook=None, r=replacement: r)[:, :-1], targets
            )
            acc.ce += float(ce.sum(dtype=torch.float64))
            acc.kl += float(ref.kl(logp).sum(dtype=torch.float64))
        for name, reconstruct in saes.items():
            x_hat = reconstruct(x.reshape(-1, x.shape[-1])).reshape(x.shape).to(x.dtype)
            ce, logp = _ce_per_token(
                _run(bridge, tokens, hook, lambda a, hook=None, r=x_hat: r)[:, :-1], targets
            )
            s = sums[name]
            dce = (ce - ce_c).double()
            s.ce += float(ce.sum(dtype=torch.float64))
            s.dce += float(dce.sum())
            s.dce_sq += float(dce.square().sum())
            s.kl += float(ref.kl(logp).sum(dtype=torch.float64))
            xf, xh = x.reshape(-1, x.shape[-1]).double(), x_hat.reshape(-1, x.shape[-1]).double()
            norms = xf.norm(dim=-1)
            ok = norms > 0
            s.norm_ratio += float((xh.norm(dim=-1)[ok] / norms[ok]).sum())
            s.rows += int(ok.sum())
            s.xhat_sq += float(xh.square().sum())
            s.x_dot_xhat += float((xf * xh).sum())
        bar.update(ce_c.numel())
    bar.close()
    return summarise(clean, zero, mean_abl, sums, n_tokens)


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def summarise(clean: _Sums, zero: _Sums, mean_abl: _Sums, sums: dict[str, _Sums], n: int) -> dict:
    ce_clean, ce_zero, ce_mean = clean.ce / n, zero.ce / n, mean_abl.ce / n
    kl_zero = zero.kl / n
    out = {
        "tokens": n,
        "ce_clean": ce_clean,
        "ce_zero": ce_zero,
        "ce_mean": ce_mean,
        "kl_zero": kl_zero,
        "kl_mean": mean_abl.kl / n,
        "saes": {},
    }
    for name, s in sums.items():
        ce_sae, kl = s.ce / n, s.kl / n
        dce = s.dce / n
        var = max(s.dce_sq / n - dce * dce, 0.0)
        out["saes"][name] = {
            "ce_sae": ce_sae,
            "delta_ce": dce,
            "delta_ce_se": math.sqrt(var / max(n - 1, 1)),
            "ce_loss_recovered": _ratio(ce_zero - ce_sae, ce_zero - ce_clean),
            "ce_loss_recovered_mean": _ratio(ce_mean - ce_sae, ce_mean - ce_clean),
            "kl": kl,
            "kl_div_score": _ratio(kl_zero - kl, kl_zero),
            "norm_ratio": _ratio(s.norm_ratio, s.rows),
            "relative_reconstruction_bias": _ratio(s.xhat_sq, s.x_dot_xhat),
        }
    return out
