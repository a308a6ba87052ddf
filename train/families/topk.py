"""``topk``: the TopK SAE of Gao et al. (2024), "Scaling and evaluating sparse autoencoders";
the peer implementation we follow is EleutherAI's sparsify.

    codes = TopK_k(ReLU((x - b_dec) @ W_enc + b_enc))      the k largest per row, others 0
    x_hat = codes @ dn + b_dec                             dn: unit-norm decoder rows
    loss  = mean_batch(sum_d (x_hat - x)^2) + AuxK         (``auxk.py``)

The knob is k (``top_k``, ``--topk``): one dictionary per value, a larger k is denser. Applying
ReLU before or after the top-k gives the same codes (OpenAI applies it after, sparsify before).
AuxK defaults: coefficient 1/32 (Gao et al.), k_aux = d_in // 2 (sparsify), a latent is dead
after ``dead_window`` batches without firing (see ``auxk.py`` for its definition and sources).

Deviations from the paper and sparsify:
- the decoder rows are kept at unit norm by using W_dec / ||W_dec|| in the forward pass (at unit
  norm its gradient is the raw gradient with the radial part removed, what Gao et al. and
  sparsify do by hand) and renormalising the raw rows after every optimiser step;
- no geometric-median init of b_dec (Gao et al.): b_dec starts at 0 (as sparsify's does);
  the encoder starts as the decoder's transpose (as in both) from this project's decoder init;
- the reconstruction loss is the summed squared error per row, averaged over the batch (the
  paper's ||x - x_hat||^2), not sparsify's fraction of variance unexplained; the AuxK term is
  normalised by the residual's variance (OpenAI) rather than the input's (sparsify);
- a k above the dictionary size is capped at the size (that dictionary is then a plain ReLU SAE
  with a decoder bias); the saved dictionary records the k it used;
- no Adam epsilon / learning-rate scaling with the dictionary size (Gao et al.): the run's lr.
"""

from __future__ import annotations

import torch

from unsuperpose.train.config import AuxKOptions
from unsuperpose.train.dictionary import AffineSAE
from unsuperpose.train.families.auxk import auxk_loss
from unsuperpose.train.families.stacked import StackedGroup
from unsuperpose.train.knobs import K
from unsuperpose.train.registry import Family, SAELens, register


def row_topk(act: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of every row of ``act`` (last dim) kept, the others set to 0."""
    vals, idx = act.topk(min(k, act.shape[-1]), dim=-1, sorted=False)
    return torch.zeros_like(act).scatter(-1, idx, vals)


class TopKSAE(AffineSAE):
    """codes = the top ``config["k"]`` of ReLU(pre) in every row."""

    arch = "topk"

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        return row_topk(torch.relu(pre), int(self.config["k"]))


class TopKGroup(StackedGroup):
    """S TopK SAEs, one per k in ``values``, trained by autograd."""

    arch = "topk"
    dictionary_class = TopKSAE

    def init_extra(self) -> dict[str, torch.Tensor]:
        self.k = [min(int(v), self.n) for v in self.values]
        self.k_max = max(self.k)
        # (S, k_max): rank j of dictionary s's row top-k is kept iff j < k_s; None when every
        # dictionary has the same k (nothing to mask).
        ks = torch.tensor(self.k, device=self.device)
        ranks = torch.arange(self.k_max, device=self.device)
        self.rank_keep = None if len(set(self.k)) == 1 else (ranks < ks[:, None]).float()
        return {}

    def codes(self, pre: torch.Tensor, training: bool) -> torch.Tensor:
        """(B, S, n) -> the top k_s of ReLU(pre) per row of dictionary s; training or not."""
        act = torch.relu(pre)
        if self.rank_keep is None:
            return row_topk(act, self.k_max)
        vals, idx = act.topk(self.k_max, dim=-1)  # sorted: rank j is position j
        return torch.zeros_like(act).scatter(-1, idx, vals * self.rank_keep)

    def extra_loss(self, x, pre, codes, x_hat, err, dn) -> torch.Tensor:
        return auxk_loss(self, pre, err, dn)

    def dictionary_config(self, s: int) -> dict:
        return {"k": self.k[s]}


TOPK = register(
    Family(
        name="topk",
        knob=K,
        group=TopKGroup,
        dictionary=TopKSAE,
        options=(AuxKOptions,),
        saelens=SAELens("topk"),
        source="Gao et al. 2024, 'Scaling and evaluating sparse autoencoders' (TopK, AuxK); "
        "peer: EleutherAI sparsify",
    )
)
