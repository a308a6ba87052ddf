"""``batchtopk``: the BatchTopK SAE of Bussmann, Leask & Nanda (2024), "BatchTopK Sparse
Autoencoders"; the peer implementation we follow is dictionary_learning's ``BatchTopKSAE``.

Training: of ReLU(pre) over the whole batch (B x n entries per dictionary) the B*k largest are
kept, the others set to 0, so k is the average number of active latents per row and a row may
use more or fewer. Loss: mean_batch(sum_d (x_hat - x)^2) + AuxK (``auxk.py``: coefficient 1/32,
k_aux = d_in // 2, dead after ``dead_window`` batches).

Inference: a batch rule cannot encode one row, so each dictionary learns one threshold:
after step ``threshold_from * steps`` (default 0.2 of training), every step's smallest kept
positive code ``m`` updates ``threshold = momentum * threshold + (1 - momentum) * m`` (momentum
0.999, dictionary_learning's), starting at the first ``m``. Then
codes = ReLU(pre) * (pre > threshold), a JumpReLU with one threshold shared by every latent.
The threshold is -1 until it has been estimated; a dictionary encoded before that (a run
shorter than ``threshold_from`` of its steps, or evaluated early) falls back to the per-row top k,
in the group and in the saved dictionary alike.

Deviations from the paper and dictionary_learning:
- the threshold's averaging starts at a fraction of the run (dictionary_learning: step 1000);
- a batch without any positive code leaves the threshold as it is (dictionary_learning averages
  in 0);
- the AuxK term carries sparsify's scale min(n_dead / k_aux, 1), which dictionary_learning's
  lacks;
- under data parallelism each rank keeps the top (its rows) * k of its own slice, not of the
  global batch; the threshold's minimum is taken over all ranks (a "min" reduction);
- unit-norm decoder rows kept by normalising in the forward pass and renormalising after every
  step; b_dec starts at 0 (dictionary_learning: the geometric median of a sample); k capped at
  the dictionary size. As for ``topk``.
"""

from __future__ import annotations

import torch

from unsuperpose.train.config import AuxKOptions, BatchTopKOptions
from unsuperpose.train.dictionary import AffineSAE
from unsuperpose.train.families.stacked import Reductions
from unsuperpose.train.families.topk import TopKGroup, row_topk
from unsuperpose.train.knobs import K
from unsuperpose.train.registry import Family, SAELens, register


class BatchTopKSAE(AffineSAE):
    """codes = ReLU(pre) * (pre > threshold); ``threshold`` (d_sae,) holds the dictionary's one
    learnt threshold in every entry. A threshold still at -1 (never estimated) means the per-row
    top ``config["k"]`` instead."""

    arch = "batchtopk"
    extra_tensors = ("threshold",)

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        if bool((self.threshold < 0).any()):
            return row_topk(torch.relu(pre), int(self.config["k"]))
        return torch.relu(pre) * (pre > self.threshold)


class BatchTopKGroup(TopKGroup):
    """S BatchTopK SAEs, one per k in ``values``, trained by autograd."""

    arch = "batchtopk"
    dictionary_class = BatchTopKSAE

    def init_buffers(self) -> dict[str, torch.Tensor]:
        return {"threshold": torch.full((self.S,), -1.0, device=self.device)}

    @property
    def threshold(self) -> torch.Tensor:
        return self.buffers["threshold"]

    def codes(self, pre: torch.Tensor, training: bool) -> torch.Tensor:
        """Training: the batch top B*k_s of ReLU(pre) per dictionary (and the smallest kept
        positive code, for the threshold). Otherwise: the threshold, or where it is still -1,
        the per-row top k."""
        if training:
            return self.batch_codes(pre)
        thr = self.threshold[:, None]  # (S, 1) against (B, S, n)
        codes = torch.relu(pre) * (pre > thr)
        unset = self.threshold < 0
        if bool(unset.any()):  # inference only: a host read is fine here
            codes = torch.where(unset[:, None], super().codes(pre, training), codes)
        return codes

    def batch_codes(self, pre: torch.Tensor) -> torch.Tensor:
        B = len(pre)
        act = torch.relu(pre).transpose(0, 1).reshape(self.S, B * self.n)
        out, smallest = [], []
        for s, k in enumerate(self.k):
            vals, idx = act[s].topk(B * k, sorted=False)
            out.append(torch.zeros_like(act[s]).scatter(0, idx, vals))
            with torch.no_grad():
                v = vals.detach()
                smallest.append(torch.where(v > 0, v, torch.inf).amin())
        # The smallest positive code kept this step per dictionary (inf: none); combined over
        # ranks with "min" and read by ``after_step``.
        self.kept_min = torch.stack(smallest)
        return torch.stack(out).view(self.S, B, self.n).transpose(0, 1)

    def step_reductions(self) -> Reductions:
        return {"kept_min": (self.kept_min, "min")}

    @torch.no_grad()
    def after_step(self, reduced: Reductions, step: int) -> None:
        opts = self.config.batchtopk
        if step <= opts.threshold_from * self.config.steps:
            return
        m = opts.threshold_momentum
        kept_min = reduced["kept_min"][0]
        thr = self.threshold
        new = torch.where(thr < 0, kept_min, m * thr + (1 - m) * kept_min)
        thr.copy_(torch.where(torch.isfinite(kept_min), new, thr))

    def dictionary_tensors(self, s: int, dn: torch.Tensor) -> dict[str, torch.Tensor]:
        t = super().dictionary_tensors(s, dn)
        t["threshold"] = self.threshold[s].expand(self.n).clone()
        return t


BATCHTOPK = register(
    Family(
        name="batchtopk",
        dictionary=BatchTopKSAE,
        knob=K,
        group=BatchTopKGroup,
        options=(AuxKOptions, BatchTopKOptions),
        # SAELens's own BatchTopK saves as JumpReLU with the threshold repeated (train.saelens)
        saelens=SAELens("jumprelu", training_architecture="batchtopk", topk_while_unset=True),
        source="Bussmann, Leask & Nanda 2024, 'BatchTopK Sparse Autoencoders' (AuxK from "
        "Gao et al. 2024); peer: dictionary_learning's BatchTopKSAE",
    )
)
