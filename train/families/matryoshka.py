"""``matryoshka``: the Matryoshka SAE of Bussmann et al. (2025), "Learning multi-level features
with Matryoshka SAEs" (after Nabeshima 2024, "Matryoshka sparse autoencoders"), with BatchTopK
codes as in the paper.

Codes, the inference threshold and AuxK are BatchTopK's (``batchtopk.py``). The loss asks every
nested prefix of the dictionary to reconstruct x on its own:

    m_p   = max(1, round(f_p * n))     for the prefix fractions f_p (``matryoshka.prefixes``,
                                       default 1/16, 1/8, 1/4, 1/2, 1; the last is always 1)
    loss  = sum_p mean_batch(sum_d (x - (codes[:, :m_p] @ dn[:m_p] + b_dec))^2) + AuxK

The last prefix is the whole dictionary, i.e. the usual reconstruction loss (``recon_loss``);
``extra_loss`` adds the smaller prefixes (built up chunk by chunk, one decode in all) and AuxK,
whose residual is the whole dictionary's, as in the paper's code.

Deviations:
- the prefix losses are summed, as the paper writes the loss; Bussmann et al.'s code averages
  per-coordinate MSEs over the prefixes and a bias-only term, and dictionary_learning weights
  them: a constant factor on the reconstruction part, which changes its balance with AuxK;
- fixed prefixes (Bussmann et al.), not prefixes sampled every batch (Nabeshima); prefix sizes
  that round to the same m_p (a small dictionary) count once; ``round`` is Python's;
- as for ``batchtopk``: unit-norm decoder rows by normalising in the forward pass and after
  every step, b_dec starts at 0, the threshold's averaging starts at a fraction of the run.
"""

from __future__ import annotations

import torch

from unsuperpose.train.config import AuxKOptions, BatchTopKOptions, MatryoshkaOptions
from unsuperpose.train.families.batchtopk import BatchTopKGroup, BatchTopKSAE
from unsuperpose.train.knobs import K
from unsuperpose.train.registry import Family, SAELens, register


class MatryoshkaSAE(BatchTopKSAE):
    """Encodes and decodes as a BatchTopK SAE; its config records the prefix sizes it was
    trained with (``prefix_sizes``), in latents, the last being ``d_sae``."""

    arch = "matryoshka"


def prefix_sizes(fractions: list[float], n: int) -> list[int]:
    """The distinct prefix sizes, increasing, each max(1, round(f * n)) and at most n."""
    return sorted({min(n, max(1, round(f * n))) for f in fractions})


class MatryoshkaGroup(BatchTopKGroup):
    """S Matryoshka BatchTopK SAEs, one per k in ``values``, trained by autograd."""

    arch = "matryoshka"
    dictionary_class = MatryoshkaSAE

    def init_extra(self) -> dict[str, torch.Tensor]:
        self.prefix_sizes = prefix_sizes(self.config.matryoshka.prefixes, self.n)
        return super().init_extra()

    def extra_loss(self, x, pre, codes, x_hat, err, dn) -> torch.Tensor:
        loss = super().extra_loss(x, pre, codes, x_hat, err, dn)  # AuxK
        partial = self.b_dec.unsqueeze(1) - x  # (S, B, d): the empty prefix's error
        start = 0
        for m in self.prefix_sizes:
            if m == self.n:  # the whole dictionary: recon_loss(err) already counts it
                break
            chunk = codes[:, :, start:m].transpose(0, 1)  # (S, B, m - start)
            partial = partial + torch.bmm(chunk, dn[:, start:m])
            loss = loss + self.recon_loss(partial)
            start = m
        return loss

    def dictionary_config(self, s: int) -> dict:
        return {**super().dictionary_config(s), "prefix_sizes": list(self.prefix_sizes)}


MATRYOSHKA = register(
    Family(
        name="matryoshka",
        dictionary=MatryoshkaSAE,
        knob=K,
        group=MatryoshkaGroup,
        options=(AuxKOptions, BatchTopKOptions, MatryoshkaOptions),
        saelens=SAELens(
            "jumprelu", training_architecture="matryoshka_batchtopk", topk_while_unset=True
        ),
        source="Bussmann et al. 2025, 'Learning multi-level features with Matryoshka SAEs' "
        "(BatchTopK codes, AuxK); Nabeshima 2024; peers: bartbussmann/matryoshka_sae, "
        "dictionary_learning's MatryoshkaBatchTopKSAE",
    )
)
