"""`analyze methods`: every method of one layer (SAEs and fitted baselines) on one page."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from unsuperpose.analyze.methods import Point, at_budget, budgets, pareto, pick_matched
from unsuperpose.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pt(arch: str, l0: float, fvu: float, size: int = 64, dce: float | None = None) -> Point:
    return Point(
        arch=arch,
        set_name="s",
        sae_dir=Path(f"{arch}-{size}-{l0}"),
        size=size,
        size_label=str(size),
        knob="k",
        value=l0,
        l0=l0,
        fvu=fvu,
        heldout_rows=100,
        delta_ce=dce,
    )


def test_the_frontier_keeps_only_points_nothing_beats_on_both_axes():
    pts = [pt("relu", 4, 0.5), pt("relu", 8, 0.6), pt("relu", 16, 0.2), pt("relu", 2, 0.9)]
    assert [(p.l0, p.fvu) for p in pareto(pts, "fvu")] == [(2, 0.9), (4, 0.5), (16, 0.2)]


def test_a_budget_compares_only_what_is_that_sparse_and_needs_two_methods():
    pts = [pt("relu", 3, 0.4), pt("relu", 7, 0.1), pt("pca", 8, 0.3), pt("pca", 64, 0.0)]
    assert at_budget([p for p in pts if p.arch == "pca"], 4, "fvu") is None  # never extrapolated
    assert at_budget([p for p in pts if p.arch == "relu"], 8, "fvu").fvu == 0.1
    assert budgets(pts, 64) == [8, 16, 32, 64]  # below 8 only relu has a point
    assert budgets(pts, 1024) == [8, 16, 32, 64]  # past the densest dictionary: nothing new
    assert budgets(pts[:3], 1024) == [8]


def test_the_browsed_dictionary_is_the_nearest_l0_in_log_and_the_larger_on_a_tie():
    pts = [pt("relu", 4, 0.5, 64), pt("relu", 16, 0.2, 64), pt("relu", 16, 0.3, 128)]
    pts += [pt("pca", 2, 0.9), pt("pca", 20, 0.1)]
    picked = pick_matched(pts, 8)
    assert picked["relu"].size == 128 and picked["relu"].l0 == 16  # 4 and 16 tie: the larger
    assert picked["pca"].l0 == 20  # 2.5x off, against 4x
    assert pick_matched(pts, 3)["pca"].l0 == 2


def test_methods_page_compares_saes_with_baselines_and_the_neurons(analyze_runs, tmp_path, capsys):
    runs = tmp_path / "runs"
    layer = runs / "sae" / "tiny" / "layer1"
    shutil.copytree(analyze_runs / "sae" / "tiny" / "layer1" / "1x+2x", layer / "1x+2x")
    store = analyze_runs / "acts" / "tiny" / "layer1.zarr"
    # a TopK set beside the ReLU grid under the same layer folder (as `make real` trains one),
    # and the baselines at the same k
    for arch, size, ks in (
        ("topk", "2x", "4,16"),
        ("pca", "1x", "4,16,all"),
        ("neurons", "1x", "4,16,all"),
    ):
        args = ["train", "--store", str(store), "--out", str(layer), "--arch", arch, "--dict-sizes"]
        args += [size, "--topk", ks, "--steps", "20", "--batch-size", "64"]
        assert main([*args, "--splice-tokens", "60", "--wandb", "disabled", "--no-progress"]) == 0
    assert (layer / "topk-2x" / "summary.csv").exists()
    capsys.readouterr()
    out = tmp_path / "methods"
    args = ["analyze", "methods", "--runs", str(runs), "--lm", "tiny", "--layer", "1"]
    assert main([*args, "--out", str(out), "--top", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "token concentration, store neurons" in printed and f"methods: {out}" in printed
    rows = list(csv.DictReader(open(out / "methods.csv")))
    assert {r["arch"] for r in rows} == {"relu", "topk", "pca", "neurons"}
    assert {r["kind"] for r in rows if r["arch"] in ("pca", "neurons")} == {"baseline"}
    assert {r["kind"] for r in rows if r["arch"] == "topk"} == {"SAE"}
    # TopK's held-out L0 is its k: it sits at the baselines' budgets, matched
    topk_l0 = sorted(float(r["heldout_l0"]) for r in rows if r["arch"] == "topk")
    assert len(topk_l0) == 2 and topk_l0[0] <= 4 and 4 < topk_l0[1] <= 16
    record = json.loads((out / "methods.json").read_text())
    assert record["d"] == 64 and record["target_l0"] == 8
    assert set(record["picked"]) == {"relu", "topk", "pca", "neurons"}
    assert {"relu", "topk", "pca", "neurons", "store neurons"} <= set(record["concentration"])
    # every budget that the baselines and the SAEs share is read, TopK among the SAEs
    assert any(line.startswith("L0 ≤ 16:") for line in record["fidelity"])
    # the neuron basis with every coefficient is the store's neurons: the same score
    for arch, c in record["concentration"].items():
        assert c["scored"] >= 0 and (c["mean"] is None or 0 < c["mean"] <= 1), arch
    page = (out / "index.html").read_text()
    assert "Interpretability at matched L0" in page and "Lowest held-out FVU" in page
    matched = page[page.index("Lowest ΔCE (nats) at L0 ≤ budget") :]
    assert '<td class="l">topk</td>' in matched and " ± " in matched  # ΔCE with its SE
    assert len(list((out / "features").glob("*.html"))) == 6  # 4 picks + neurons + index


def test_the_report_refuses_a_baseline_and_points_to_methods(analyze_runs, capsys):
    args = ["analyze", "report", "--runs", str(analyze_runs), "--lm", "tiny", "--arch", "pca"]
    assert main(args) == 2
    assert "analyze methods" in capsys.readouterr().err
