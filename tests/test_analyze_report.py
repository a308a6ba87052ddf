"""The report end to end on a tiny run: every promised figure, embedded; provenance; errors."""

import json

import matplotlib.image as mpimg
import pytest

from unsuperpose.cli import main

LM_HEATMAPS = [
    "dead",
    "ssll",
    "heldout_mse",
    "heldout_l1_loss",
    "heldout_l0",
    "heldout_fvu",
    "mmcs_larger",
    "ce_loss_recovered",
    "delta_ce",
    "kl",
]
COMPARISONS = ["dead", "ssll", "mmcs_larger"]


@pytest.fixture(scope="module")
def report(analyze_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    code = main(
        [
            "analyze",
            "report",
            "--runs",
            str(analyze_runs),
            "--lm",
            "tiny",
            "--layer",
            "1",
            "--out",
            str(out),
            "--no-progress",
            "--top",
            "5",
        ]
    )
    assert code == 0
    return out


def test_every_promised_figure_is_drawn_and_embedded(report):
    figs = {p.stem: p for p in (report / "figures").glob("*.png")}
    want = (
        {f"lm_heatmap_{c}" for c in LM_HEATMAPS}
        | {f"compare_{c}" for c in COMPARISONS}
        | {"lm_frontier_delta_ce", "lm_frontier_fvu"}
    )
    assert want <= set(figs)
    for name in COMPARISONS:  # toy and LM side by side: a wide figure
        h, w = mpimg.imread(figs[f"compare_{name}"]).shape[:2]
        assert w > 1.5 * h
    html = (report / "index.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(figs)
    # Self-contained: nothing fetched from elsewhere.
    assert "http://" not in html and "https://" not in html and "<link" not in html


def test_the_page_says_where_each_diagnostic_points_and_where_the_data_came_from(
    report, analyze_runs
):
    html = (report / "index.html").read_text()
    for text in (
        "dead neurons",
        "loss stickiness (SSLL)",
        "MMCS with larger dictionaries",
        "The best recovery is at",
        "Estimate.</b> tiny layer 1:",
        "toy: at the truth (1x)?",
        "largest dictionary without dead latents",
        "blocks.1.mlp.hook_post",
        str(analyze_runs / "acts" / "tiny" / "layer1.zarr"),
        "unsuperpose train --store",
        "unsuperpose toy --out",
        "unsuperpose analyze report --runs",
        "unsuperpose harvest --lm",
    ):
        assert text in html, text
    rec = json.loads((report / "diagnosis.json").read_text())
    names = [p["diagnostic"] for p in rec["lm"]["pointers"]]
    assert names[:4] == [
        "dead neurons",
        "loss stickiness (SSLL)",
        "MMCS with larger dictionaries",
        "live latents",
    ]
    # the window rule from the run's own observables, and what follows from it
    rule = rec["lm"]["window_rule"]
    assert rule["batch_size"] and rule["heldout_rows"] and rule["steps"]
    if rule["readable"]:
        assert rule["window"] >= 1 and "novel latents" in names
        assert rule["steps"] >= rule["steps_needed"]
    else:
        assert all(p["reading"] is False for p in rec["lm"]["pointers"])
        assert rec["lm"]["estimate"]["no_estimate"]
        assert "no estimate" in html
    assert rec["toy"]["optimum"]["size"] in (32, 64) and rec["toy"]["base"] == 32
    assert all("size_steps_off" in p and "matches_optimum" in p for p in rec["toy"]["pointers"])
    assert rec["toy"]["truth"] == {"size": 32, "ratio": 1.0}
    assert rec["lm"]["base"] == 64 and "estimate" in rec["lm"]
    # how far the relu default reading is calibrated, beside the estimate
    from unsuperpose.analyze.diagnostics import CALIBRATION, calibration_text

    default = rec["lm"]["default_reading"]
    assert default["calibration"] == CALIBRATION["relu"]
    assert default["calibration_text"] == calibration_text("relu")
    assert "<b>Calibration.</b> On toy data with a known number of features G, relu" in html
    rows = (report / "lm_grid.csv").read_text().splitlines()
    assert len(rows) == 1 + 4


def test_the_feature_browser_of_the_pointed_dictionary_is_linked(report):
    pages = sorted(p.name for p in (report / "features").glob("*.html"))
    assert "neurons.html" in pages and "index.html" in pages and len(pages) == 3
    html = (report / "index.html").read_text()
    assert 'href="features/neurons.html"' in html


def test_no_dictionaries_is_one_clear_error(tmp_path, capsys):
    code = main(["analyze", "report", "--runs", str(tmp_path), "--lm", "tiny", "--layer", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no dictionaries found" in err and "make train" in err and "Traceback" not in err


def test_an_open_estimate_is_printed_as_a_bound_and_says_the_grid_must_grow():
    from unsuperpose.analyze.report_page import estimate_text

    text = estimate_text(
        {"low": None, "high": None, "median": None, "sizes": [64], "more_than": 512}, 64, "lm"
    )
    assert "more than 512 features" in text and "grid must grow" in text and "about" not in text
    closed = estimate_text(
        {"low": 64, "high": 64, "median": 64, "sizes": [64, 64], "more_than": None}, 64, "lm"
    )
    assert "64 latents (1x of 64)" in closed and "about 64 features" in closed


def test_a_set_trained_for_other_steps_is_refused_by_the_report_and_sets_picks_one(
    analyze_runs, tmp_path, capsys
):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(analyze_runs, runs)
    base = runs / "sae" / "tiny" / "layer1"
    longer = base / "4x"
    shutil.copytree(base / "1x+2x", longer)
    for cfg_path in (longer / "saes").glob("*/config.json"):
        cfg = json.loads(cfg_path.read_text())
        cfg["training"]["steps"] = 600
        cfg["metrics"]["steps"] = 600
        cfg_path.write_text(json.dumps(cfg))
    argv = [
        "analyze",
        "report",
        "--runs",
        str(runs),
        "--lm",
        "tiny",
        "--layer",
        "1",
        "--out",
        str(tmp_path / "report"),
        "--no-features",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not one grid" in err and "steps: 60 vs 600" in err
    assert "name its sets, e.g. --sets " in err and "sets='" not in err  # the flag, not the keyword
    assert "Traceback" not in err and not (tmp_path / "report").exists()
    assert main(argv + ["--sets", "1x+2x"]) == 0
    rec = json.loads((tmp_path / "report" / "diagnosis.json").read_text())
    assert rec["sets"] == [str(base / "1x+2x")]
    assert "dead_sensitivity" in rec["lm"] and rec["lm"]["dead_reading"]["window"] == 20
    assert rec["lm"]["dead_reading"]["literal_rule"]["tolerance"] == 0.0


@pytest.mark.slow
def test_a_topk_grid_beside_the_relu_one_is_trained_reported_and_browsed(
    analyze_runs, tmp_path, capsys
):
    """`train --arch topk` writes its own set beside relu's; `analyze report --arch topk` reads
    only it (k as the knob, spliced-in CE, the browser), and relu's report is unchanged."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(analyze_runs, runs)
    store = runs / "acts" / "tiny" / "layer1.zarr"
    common = ["--store", str(store), "--out", str(runs / "sae" / "tiny" / "layer1"), "--wandb"]
    common += ["disabled", "--no-progress", "--steps", "60", "--batch-size", "64"]
    assert main(["train", *common, "--arch", "topk", "--topk", "4,8", "--dict-sizes", "1x,2x"]) == 0
    topk_set = runs / "sae" / "tiny" / "layer1" / "topk-1x+2x"
    assert (topk_set / "saes" / "topk-n64-k_4" / "sae.safetensors").exists()
    rows = (topk_set / "summary.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"arch", "sparsity_name", "sparsity", "ce_loss_recovered"} <= set(header)
    assert len(rows) == 1 + 4

    out = tmp_path / "report"
    args = ["analyze", "report", "--runs", str(runs), "--lm", "tiny", "--layer", "1"]
    capsys.readouterr()
    assert main([*args, "--arch", "topk", "--out", str(out), "--no-progress", "--top", "5"]) == 0
    from unsuperpose.analyze.diagnostics import calibration_text

    assert calibration_text("topk") in capsys.readouterr().out  # printed beside the estimate
    html = (out / "index.html").read_text()
    assert "(topk dictionaries)" in html and "per k</h3>" in html
    assert "--arch topk --topk 4,8" in html  # the reproduction command
    grid = (out / "lm_grid.csv").read_text().splitlines()
    assert len(grid) == 1 + 4 and all(",topk," in r for r in grid[1:])
    assert len(list((out / "features").glob("*.html"))) == 3

    relu = tmp_path / "relu"
    assert main([*args, "--out", str(relu), "--no-progress", "--no-features"]) == 0
    assert len((relu / "lm_grid.csv").read_text().splitlines()) == 1 + 4
    capsys.readouterr()
    assert main([*args, "--arch", "jumprelu", "--out", str(tmp_path / "j")]) == 2
    assert "no jumprelu dictionary set" in (err := capsys.readouterr().err)
    assert "Choose one architecture, e.g. --arch " in err
    assert not (tmp_path / "j").exists()


def test_the_page_states_the_clean_ce_and_the_cost_of_ablating_the_layer(report):
    """CE loss recovered is read against the model's own loss: the page says what they are."""
    import csv

    rows = list(csv.DictReader((report / "lm_grid.csv").open()))
    r = max(rows, key=lambda r: int(float(r["splice_tokens"])))
    clean, zero, mean = (float(r[c]) for c in ("ce_clean", "ce_zero", "ce_mean"))
    html = (report / "index.html").read_text()
    assert "clean and ablated.</b>" in html
    assert f"clean CE {clean:.3f} nats per token on {int(float(r['splice_tokens'])):,}" in html
    assert f"Zero-ablating blocks.1.mlp.hook_post raises it to {zero:.3f} nats" in html
    assert f"(+{zero - clean:.3f})" in html and f"to {mean:.3f} nats (+{mean - clean:.3f})" in html


def test_the_ablation_text_takes_the_largest_evaluation_and_is_silent_without_one():
    from unsuperpose.analyze.report_page import ablation_text

    rows = [
        {"ce_clean": 2.0, "ce_zero": 3.0, "ce_mean": 2.5, "splice_tokens": 1024},
        {"ce_clean": 1.9, "ce_zero": 3.9, "ce_mean": 2.4, "splice_tokens": 16384},
        {"ce_clean": float("nan"), "ce_zero": 9.0, "ce_mean": 9.0, "splice_tokens": 99999},
    ]
    text = ablation_text(rows, "smollm2 layer 3", "blocks.3.mlp.hook_post")
    assert text.startswith("smollm2 layer 3: clean CE 1.900 nats per token on 16,384 predicted")
    assert "Zero-ablating blocks.3.mlp.hook_post raises it to 3.900 nats (+2.000)" in text
    assert "mean-ablating it (the store's mean) to 2.400 nats (+0.500)" in text
    assert "One point of CE loss recovered is 0.0200 nats here." in text
    assert ablation_text([{"l1": 1e-3, "dict_size": 64}], "lm", None) == ""
