"""``benchmarks/bench_peers.py``: our side runs, and its records say what the speed page reads.

The peers' side needs a venv with sae-lens, dictionary-learning and eai-sparsify
(docs/development.md shows how to make one); its test runs only where ``PEERS_PYTHON`` names one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import bench_peers as bp

SHAPE = {"tiny": (64, 16, 128)}  # batch, d, n
K = 4
DEAD = 128 // 16


def _run(exe, rounds=2, archs=tuple(bp.OURS), shape=SHAPE):
    kw = dict(archs=list(archs), rounds=rounds, target_s=0.01, exe=exe, threads=1)
    return list(bp.run_bench(shape, K, **kw))


def _by(records, figure):
    return [r for r in records if r.get("figure") == figure]


def test_our_side_runs_and_every_peer_reads_na_without_a_venv():
    records = _run(exe=None)
    (setup,) = _by(records, "peers_setup")
    assert setup["dead_latents_held"] == DEAD and setup["matryoshka_widths"][-1] == 128
    for arch, peers in bp.PEERS.items():
        for peer in peers:
            assert "PEERS_PYTHON" in setup["na"][arch][peer]
    assert "sparsify" in setup["na"]["relu"]  # what a peer lacks is said, not left out

    rounds = _by(records, "peers_round")
    assert [(r["arch"], r["round"]) for r in rounds] == [(a, i) for i in range(2) for a in bp.OURS]
    for r in rounds:
        assert len(r["load"]) == 3 and len(r["gemm_peak_gflops"]) == 2
        assert min(r["gemm_peak_gflops"]) > 0
        assert set(r["samples_s"]) == set(bp.OURS[r["arch"]])
        assert all(v > 0 for v in r["samples_s"].values())
        for name, rate in r["samples_s"].items():  # the fraction is of the encoder GEMM alone
            assert r["of_encoder_gemm"][name] == pytest.approx(
                rate / r["encoder_gemm_samples_s"], rel=0.01, abs=1e-3
            )
        assert r["ours_vs"] == {}
        # AuxK works on the held-dead latents every step, and they stay dead
        held = DEAD if r["arch"] in bp.K_ARCHS else 0
        assert r["dead"]["ours"] == held
        if r["arch"] == "topk":
            assert r["dead"]["ours-noauxk"] == 0

    summaries = _by(records, "peers_summary")
    assert [s["arch"] for s in summaries] == list(bp.OURS)
    for s in summaries:
        assert s["rounds"] == 2 and s["fastest_peer"] is None and s["weakest_vs"] is None
        assert s["goal_1_5x_fastest_peer"] is None  # not judged without a peer
        if s["arch"] in bp.K_ARCHS:
            assert isinstance(s["goal_within_2x_encoder_gemm"], bool)
        if bp.arch_of(s["arch"]) == "relu":
            assert s["goal_2x_saelens"] is None
        lo, hi = s["load_1m"]
        assert lo <= hi
    assert bp.table(records).count("\n") == 1 + len(summaries)


def test_ours_jumprelu_starts_at_the_peers_l0():
    torch.set_num_threads(1)
    xs = bp.batches(256, 16)
    ours = bp.Ours("jumprelu", xs, 128, K, DEAD)
    g = ours.group
    pre = g.pre_activations(xs[0], g.dictionaries())[:, 0]
    l0 = (pre > g.extra["log_threshold"].view(-1).exp()).sum(1).float().mean()
    assert 0.5 * K <= float(l0) <= 2 * K


def test_relu_runs_dense_from_a_fresh_sae_and_sparse_from_a_trained_sparsity():
    """The two ReLU rows time different regimes, and their records say which one ran."""
    n = 512  # L0 K is 0.8% of the latents, below the sparse path's 2%
    records = _run(exe=None, rounds=1, archs=("relu", "relu-sparse"), shape={"t": (64, 16, n)})
    rounds = {r["arch"]: r for r in _by(records, "peers_round")}
    fresh, trained = rounds["relu"], rounds["relu-sparse"]
    assert fresh["ours_sparse_share"] == 0.0 and fresh["ours_l0_after"] > n / 4
    assert trained["ours_sparse_share"] == 1.0 and trained["ours_l0_after"] <= 2 * K
    summary = {s["arch"]: s for s in _by(records, "peers_summary")}["relu-sparse"]
    assert summary["ours_sparse_share"] == 1.0 and "sparsify" in summary["na"]


def test_relu_sparse_starts_at_the_peers_l0():
    torch.set_num_threads(1)
    xs = bp.batches(256, 16)
    ours = bp.Ours("relu-sparse", xs, 128, K, DEAD)
    assert ours.group.config.arch == "relu"
    assert 0.5 * K <= ours.relu_l0() <= 2 * K
    assert bp.Ours("relu", xs, 128, K, DEAD).relu_l0() > 128 / 4  # a fresh SAE is dense


def test_a_peers_venv_on_another_torch_is_refused(tmp_path):
    """The peers' venv reports its versions first; on another torch the bench stops, saying
    what to install, before it times anything."""
    fake = tmp_path / "python"  # stands in for the venv's interpreter: it only says hello
    hello = {"ready": True, "checksum": [], "versions": {"torch": "2.0.0"}}
    fake.write_text(f"#!/bin/sh\necho 'PEER {json.dumps(hello)}'\ncat > /dev/null\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"torch 2\.0\.0, ours .*install torch=="):
        _run(exe=str(fake), rounds=1, archs=["relu"])


PEERS_PYTHON = os.environ.get("PEERS_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(
    not (PEERS_PYTHON and Path(PEERS_PYTHON).exists()),
    reason="PEERS_PYTHON is unset: it names the python of a venv with sae-lens, "
    "dictionary-learning and eai-sparsify (docs/development.md shows how to make one)",
)
def test_every_peer_runs_on_the_same_batches():
    records = _run(exe=PEERS_PYTHON, rounds=1)
    (setup,) = _by(records, "peers_setup")
    assert setup["same_batches"]  # the worker drew our batches (it refuses to go on otherwise)
    assert all(setup["versions"].values()), setup["versions"]
    for r in _by(records, "peers_round"):
        for peer, ours in bp.PEERS[r["arch"]].items():
            assert peer in r["samples_s"], setup["na"].get(r["arch"], {}).get(peer)
            assert r["ours_vs"][peer] == pytest.approx(
                r["samples_s"][ours] / r["samples_s"][peer], rel=0.01
            )
            # each peer's own counters see the held-dead latents where AuxK is on
            auxk = r["arch"] in bp.K_ARCHS and peer != "sparsify-topk-noauxk"
            assert r["dead"][peer] == (DEAD if auxk else 0), (peer, r["dead"])
    for s in _by(records, "peers_summary"):
        assert isinstance(s["goal_1_5x_fastest_peer"], bool) and s["fastest_peer"]
        peer, lead = s["weakest_vs"]
        assert lead == min(s["ours_vs"].values()) and (lead >= 1.5) == s["goal_1_5x_fastest_peer"]
