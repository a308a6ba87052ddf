"""An LLM-free measure of how monosemantic a unit looks: how concentrated its top activations are
on a single token (or a single pair of previous token and token).

For a unit (an SAE latent or an MLP neuron) with at least K rows on which it fires (K = the
browser's --top, 20 by default), take its K highest-activating rows of the store:

  token concentration  C1 = (count of the most common token among those K rows) / K
  pair concentration   C2 = the same for (previous token in the block, token); a row at the start
                            of its block pairs with "no previous token"

C1 = 1: the unit's strongest activations all sit on one token (e.g. the period after "Mr");
C1 = 1/K: K different tokens. Units with fewer than K firing rows are not scored. Compared as a
distribution over the units of each dictionary and over the neurons of the same store, on the
same rows: a dictionary more monosemantic than the neuron basis shifts it to the right (the
comparison Cunningham et al. made with LLM-written explanations, here without an LLM). It sees
token-level features only; a unit about a topic spread over many tokens scores low however clean
it is, so read it as a lower bound on interpretability, not a verdict.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

N_BINS = 10


def concentration(contexts: list, k: int, pairs: bool = False) -> float | None:
    """C1 (or C2 with ``pairs``) of one unit from its top contexts (``Context``: tokens, at)."""
    if len(contexts) < k:
        return None
    keys = []
    for c in contexts[:k]:
        tok = c.tokens[c.at]
        keys.append((c.tokens[c.at - 1] if c.at > 0 else None, tok) if pairs else tok)
    return Counter(keys).most_common(1)[0][1] / k


def summary(per_unit: list[list], k: int) -> dict:
    """The distribution of C1 and C2 over the scored units of one dictionary (or the neurons)."""
    out = {"k": k}
    for name, pairs in (("token", False), ("pair", True)):
        vals = np.array(
            [v for v in (concentration(c, k, pairs) for c in per_unit) if v is not None]
        )
        out[f"{name}_scored"] = int(len(vals))
        if len(vals):
            q25, med, q75 = np.quantile(vals, [0.25, 0.5, 0.75])
            out.update(
                {
                    f"{name}_median": float(med),
                    f"{name}_q25": float(q25),
                    f"{name}_q75": float(q75),
                    f"{name}_mean": float(vals.mean()),
                    # the units are the sample: what a comparison of two dictionaries divides by
                    f"{name}_se": float(vals.std(ddof=1) / np.sqrt(len(vals)))
                    if len(vals) > 1
                    else None,
                    f"{name}_hist": np.histogram(vals, bins=N_BINS, range=(0, 1))[0].tolist(),
                }
            )
    return out
