"""Our sparse-coding learner against scikit-learn's MiniBatchDictionaryLearning.

The default toy data (h 256, G 512, seed 101; tests use seeds below 20), the first ``ROWS``
rows of its batch stream in batches of 256, centred on their mean and divided by the root of
their mean squared norm (what ``fit_sparse_coding`` does), 512 atoms, positive codes, one pass:
- ours: ``learn_dictionaries``, every alpha in one stacked pass, FISTA with ``ITERS`` iterations;
- scikit-learn: ``MiniBatchDictionaryLearning(fit_algorithm="cd", positive_code=True,
  batch_size=256, shuffle=False, max_iter=1)`` on the same rows in the same order, early stopping
  off (``tol=0``, ``max_no_improvement=None``), one fit per alpha (its alpha is ours: the same
  per-row objective, 0.5 ||x - c D||^2 + alpha ||c||_1); ``transform_algorithm`` is irrelevant
  to the fit and MMCS.
Reported: seconds, and MMCS of the truth's 512 features against the learnt atoms (signed cosine,
``analyze.metrics.mmcs``). Both run with ``THREADS`` BLAS/torch threads (threadpoolctl). The
load average is read before and after each fit; the machine is shared, so compare the two rows
of one run, not runs.

Environment: SC_ROWS (30,720), SC_ALPHAS (0.05,0.1,0.2), SC_ITERS (50), SC_THREADS (1),
SC_SKLEARN (1: run the peer; 0: ours only).
"""

from __future__ import annotations

import os
import time
import warnings

import torch
from threadpoolctl import threadpool_limits

from unsuperpose.analyze.metrics import mmcs
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train.families.sparse_coding import learn_dictionaries

SEED = 101
BATCH, ATOMS = 256, 512
ROWS = int(os.environ.get("SC_ROWS", "30720"))
ALPHAS = [float(a) for a in os.environ.get("SC_ALPHAS", "0.05,0.1,0.2").split(",")]
ITERS = int(os.environ.get("SC_ITERS", "50"))
THREADS = int(os.environ.get("SC_THREADS", "1"))
PEER = os.environ.get("SC_SKLEARN", "1") == "1"


def load() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def toy_rows(source: ToySource) -> list[torch.Tensor]:
    xs = []
    for x in source.batches(BATCH, seed=SEED):
        xs.append(x[: ROWS - BATCH * len(xs)])
        if BATCH * len(xs) >= ROWS:
            return xs
    raise AssertionError("unreachable: toy streams are endless")


def ours(xs: list[torch.Tensor], features: torch.Tensor) -> list[dict]:
    before = load()
    started = time.perf_counter()
    atoms, rows = learn_dictionaries(xs, ATOMS, ALPHAS, iters=ITERS, seed=(SEED, ATOMS))
    seconds = time.perf_counter() - started
    return [
        {
            "method": f"ours (FISTA {ITERS} iters, all alphas in one pass)",
            "alpha": alpha,
            "rows": rows,
            "seconds": round(seconds, 1),
            "mmcs": round(mmcs(features, atoms[s]), 4),
            "load_before": before,
            "load_after": load(),
        }
        for s, alpha in enumerate(ALPHAS)
    ]


def sklearn_peer(xs: list[torch.Tensor], features: torch.Tensor) -> list[dict]:
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.exceptions import ConvergenceWarning

    x = torch.cat(xs).double().numpy()
    out = []
    for alpha in ALPHAS:
        before = load()
        started = time.perf_counter()
        with warnings.catch_warnings():
            # its lasso stops at transform_max_iter on some batches; the fit goes on regardless
            warnings.simplefilter("ignore", ConvergenceWarning)
            peer = MiniBatchDictionaryLearning(
                n_components=ATOMS,
                alpha=alpha,
                batch_size=BATCH,
                max_iter=1,
                shuffle=False,
                tol=0.0,
                max_no_improvement=None,
                fit_algorithm="cd",
                transform_algorithm="lasso_cd",
                positive_code=True,
                random_state=SEED,
            ).fit(x)
        seconds = time.perf_counter() - started
        out.append(
            {
                "method": "scikit-learn MiniBatchDictionaryLearning (cd)",
                "alpha": alpha,
                "rows": len(x),
                "seconds": round(seconds, 1),
                "mmcs": round(mmcs(features, torch.as_tensor(peer.components_)), 4),
                "load_before": before,
                "load_after": load(),
            }
        )
    return out


def run() -> list[dict]:
    source = ToySource(ToyConfig(seed=SEED))
    xs = toy_rows(source)
    x = torch.cat(xs)
    mean = x.mean(0)
    scale = (x - mean).pow(2).sum(1).mean().sqrt()
    xs = [(b - mean) / scale for b in xs]
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with threadpool_limits(THREADS):
            records = ours(xs, source.features)
            if PEER:
                records += sklearn_peer(xs, source.features)
    finally:
        torch.set_num_threads(threads)
    return [{"figure": "sparse_coding_vs_sklearn", "threads": THREADS, **r} for r in records]


def table(records: list[dict]) -> str:
    lines = [f"{'method':<52} {'alpha':>6} {'rows':>7} {'seconds':>8} {'MMCS':>7} {'load':>11}"]
    for r in records:
        loads = f"{r['load_before']:.1f}-{r['load_after']:.1f}"
        lines.append(
            f"{r['method']:<52} {r['alpha']:>6g} {r['rows']:>7} {r['seconds']:>8.1f} "
            f"{r['mmcs']:>7.4f} {loads:>11}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
