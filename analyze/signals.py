"""Count signals beyond the report's three, for the dictionaries researchers train now.

Each is defined here from its source before it was read on any grid, and serves toy data and an
LM alike. Each reads, per knob value, a sequence over dictionary sizes (or, for Matryoshka,
over one dictionary's nested prefixes) and asks where growing the dictionary stops adding
something; the knob values are then pooled by the median (``pool``).

- **live latents** (the k-architectures with AuxK, and JumpReLU; README "Counting features"):
  past the number of features a larger dictionary's extra latents have nothing to learn and stay
  dead even though AuxK keeps trying to revive them, so live(n) ~ min(n, count). Per knob value,
  the pointer is the smallest size n_i whose step to the next size n_{i+1} keeps fewer than half
  of the added latents alive: live(n_{i+1}) - live(n_i) < (n_{i+1} - n_i) / 2.
- **measured latents** (added with the fourth window rule, ``analyze.evidence``, before the
  G 1,024, second-seed and independent-feature calibration grids were read): live latents judged
  on the held-out rows instead of the training window. A latent counts when it fired at least
  ``MIN_FIRES`` times there, the criterion the window rule uses to call a rate measured, so it
  counts exactly the latents at or above the rate the count claims to read (10 per held-out
  rows), whatever the window. The training window's live count also keeps latents several times
  rarer than r (a latent at r / 7 fires in W* batches with probability 0.63), and a JumpReLU
  dictionary larger than the count keeps hundreds of such sporadic latents. Pointer as for live
  latents.
- **novel latents** (Leask et al. 2025, "Sparse autoencoders do not find canonical units of
  analysis", arXiv 2502.04878; Bussmann & Leask, "Stitching SAEs of different sizes"): a larger
  dictionary's live latents split into reconstruction latents (near a latent of the smaller one)
  and novel ones. Near: decoder cosine of at least ``NOVEL_COSINE`` (0.7, the cut-off of that
  work) with some live latent of the smaller dictionary. Past the number of features, new latents
  stop appearing; the pointer is the smallest n_i whose step to n_{i+1} adds fewer novel live
  latents than half the added latents.
- **Matryoshka's prefix knee** (Bussmann et al. 2025; Nabeshima 2024): every nested prefix of a
  Matryoshka dictionary is trained to reconstruct alone, so its held-out FVU per prefix should
  fall until the prefix holds the (frequent enough) features and flatten after. On the largest
  dictionary of each knob value, the pointer is the smallest prefix m_j whose next prefix cuts
  its held-out FVU by less than ``KNEE_GAIN`` (10%).

A knob value whose sequence never stops growing says only "more than" the size whose step still
grew (a lower bound). ``pool`` takes the lower median over knob values, an open value at its
bound: a pooled pointer is a lower bound when some open bound could still move it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Key = tuple[float, int]

LIVE, NOVEL, KNEE = "live latents", "novel latents", "Matryoshka prefix knee"
MEASURED = "measured latents"
NOVEL_COSINE = 0.7
KNEE_GAIN = 0.10


def stop_growing(seq: list[tuple[int, float]], gained: Callable[[int, int], float]) -> int | None:
    """The smallest size n_i of ``seq`` ([(n, value)], by n) whose step to the next size gains
    less than half the added latents (``gained(i, i+1)``); None if every step grew."""
    for i in range(len(seq) - 1):
        if gained(i, i + 1) < (seq[i + 1][0] - seq[i][0]) / 2:
            return seq[i][0]
    return None


def per_knob(keys) -> dict[float, list[int]]:
    out: dict[float, list[int]] = {}
    for a, n in sorted(keys):
        out.setdefault(a, []).append(n)
    return out


def live_per_knob(live: dict[Key, float]) -> dict[float, tuple[int | None, bool]]:
    """Per knob value: (pointed size, open). Open: every step kept half its added latents or
    more; the size is then the second-largest, whose step to the largest still grew (a lower
    bound). Needs two sizes."""
    out = {}
    for a, sizes in per_knob(live).items():
        if len(sizes) < 2:
            continue
        seq = [(n, live[(a, n)]) for n in sizes]
        n = stop_growing(seq, lambda i, j, s=seq: s[j][1] - s[i][1])
        out[a] = (n, False) if n is not None else (sizes[-2], True)
    return out


def novel_counts(
    atoms: dict[Key, torch.Tensor], live: dict[Key, torch.Tensor], cosine: float = NOVEL_COSINE
) -> dict[Key, int]:
    """{(a, n_i): novel live latents of (a, n_{i+1})}, the next size at the same knob value:
    live latents whose best |cosine| with the live latents of (a, n_i) is below ``cosine``."""
    out = {}
    for a, sizes in per_knob(k for k in atoms if k in live).items():
        for small, big in zip(sizes, sizes[1:], strict=False):
            s = atoms[(a, small)][live[(a, small)]].float()
            b = atoms[(a, big)][live[(a, big)]].float()
            if len(b) == 0:
                out[(a, small)] = 0
                continue
            if len(s) == 0:
                out[(a, small)] = len(b)
                continue
            s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
            b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
            best = (b @ s.T).abs().max(dim=1).values
            out[(a, small)] = int((best < cosine).sum())
    return out


def novel_per_knob(novel: dict[Key, float], sizes_of: dict[float, list[int]]):
    """Per knob value: (pointed size, open) from ``novel_counts``'s column."""
    out = {}
    for a, sizes in sizes_of.items():
        if len(sizes) < 2 or any((a, n) not in novel for n in sizes[:-1]):
            continue
        seq = [(n, 0.0) for n in sizes]
        n = stop_growing(seq, lambda i, j, a=a, s=sizes: novel[(a, s[i])])
        out[a] = (n, False) if n is not None else (sizes[-2], True)
    return out


def prefix_columns(columns: dict[str, dict]) -> dict[Key, dict[int, float]]:
    """{(a, n): {m: held-out FVU of the first m latents}}, the whole dictionary included."""
    out: dict[Key, dict[int, float]] = {}
    for name, values in columns.items():
        if name.startswith("heldout_fvu_m") and name[13:].isdigit():
            for key, v in values.items():
                out.setdefault(key, {})[int(name[13:])] = v
    for key, v in (columns.get("heldout_fvu") or {}).items():
        if key in out:
            out[key][key[1]] = v
    return out


def knee_per_knob(prefixes: dict[Key, dict[int, float]], gain: float = KNEE_GAIN):
    """Per knob value, on its largest dictionary: (pointed prefix size, open)."""
    out = {}
    for a, sizes in per_knob(prefixes).items():
        fvu = sorted(prefixes[(a, sizes[-1])].items())
        if len(fvu) < 2:
            continue
        knee = next(
            (fvu[j][0] for j in range(len(fvu) - 1) if fvu[j + 1][1] >= (1 - gain) * fvu[j][1]),
            None,
        )
        out[a] = (knee, False) if knee is not None else (fvu[-2][0], True)
    return out


def pool(per: dict[float, tuple[int | None, bool]]) -> tuple[float | None, int | None, bool]:
    """(knob value, size, lower bound): the lower median over knob values, an open value taken at
    its bound (the least it can be). That median is a lower bound of the true one; it is closed
    only when every open bound is above it, so no open value can move it (in a grid whose knob
    values were trained to different sizes, an open bound may lie below a closed value)."""
    if not per:
        return None, None, False
    order = sorted((n, o, a) for a, (n, o) in per.items())  # closed before open at equal n
    n, _, a = order[(len(order) - 1) // 2]
    is_open = any(o and m <= n for m, o, _ in order)
    return a, n, is_open
