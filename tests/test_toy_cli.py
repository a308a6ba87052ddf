"""`unsuperpose toy` end to end, small: it writes every promised file; bad flags fail clearly."""

import csv

import pytest

from unsuperpose.cli import main
from unsuperpose.train import parse_dict_sizes, parse_l1_list


def test_toy_cli_writes_summary_dictionaries_and_figures(tmp_path):
    out = tmp_path / "toy"
    code = main(
        [
            "toy",
            "--out",
            str(out),
            "--h",
            "16",
            "--g",
            "32",
            "--k",
            "2",
            "--steps",
            "60",
            "--batch-size",
            "64",
            "--l1",
            "1e-3,1e-2",
            "--dict-sizes",
            "1/2x,1x,2x",
            "--eval-every",
            "20",
            "--wandb",
            "disabled",
            "--no-progress",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 6
    for col in [
        "l1",
        "dict_ratio",
        "dict_label",
        "dict_size",
        "steps",
        "samples",
        "heldout_mse",
        "heldout_l1_loss",
        "heldout_l0",
        "heldout_fvu",
        "heldout_rows",
        "dead",
        "mmcs",
        "mcc",
        "ssll",
        "mmcs_larger",
    ]:
        assert col in rows[0], col
    assert {r["dict_size"] for r in rows} == {"16", "32", "64"}
    assert {float(r["l1"]) for r in rows} == {1e-3, 1e-2}
    assert {r["dict_label"] for r in rows} == {"1/2x", "1x", "2x"}
    assert {float(r["dict_ratio"]) for r in rows} == {0.5, 1.0, 2.0}
    assert all(0 < float(r["mmcs"]) <= 1 for r in rows)
    saes = sorted(p.name for p in (out / "saes").iterdir())
    assert len(saes) == 6 and all((out / "saes" / s / "sae.safetensors").exists() for s in saes)
    for fig in ["mmcs", "dead", "heldout_mse", "heldout_l1_loss", "ssll", "mmcs_larger"]:
        assert (out / "figures" / f"heatmap_{fig}.png").stat().st_size > 1000, fig
    assert (out / "figures" / "curve_mmcs.png").exists()
    assert (out / "train_config.json").exists() and (out / "log.jsonl").exists()
    history = (out / "history.jsonl").read_text().splitlines()
    assert len(history) == 6 * 4  # steps 0, 20, 40, 60 for each SAE


@pytest.mark.parametrize("text", ["8y", "0x", "-1", "1/0x", ""])
def test_malformed_dictionary_sizes_raise(text):
    with pytest.raises(ValueError):
        parse_dict_sizes(text, 512)


def test_dictionary_sizes_parse_ratios_and_absolutes():
    assert parse_dict_sizes("1/8x,0.5x,2x,4096", 512) == [
        ("1/8x", 64),
        ("0.5x", 256),
        ("2x", 1024),
        ("4096", 4096),
    ]


def test_l1_list_that_does_not_parse_raises():
    with pytest.raises(ValueError, match="cannot parse L1"):
        parse_l1_list("1e-3,abc")
    assert parse_l1_list("1e-3, 3e-3") == [1e-3, 3e-3]


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code = main(["toy", "--out", str(tmp_path), "--dict-sizes", "8y", "--wandb", "disabled"])
    assert code == 2
    err = capsys.readouterr().err
    assert "8y" in err and "Traceback" not in err
    assert main(["toy", "--out", str(tmp_path), "--k", "600", "--wandb", "disabled"]) == 2
    recipe = ["--g", "16", "--h", "8", "--k", "4", "--decay", "0.5"]
    recipe += ["--correlation-recipe", "report", "--wandb", "disabled"]
    assert main(["toy", "--out", str(tmp_path), *recipe]) == 2
    err = capsys.readouterr().err
    assert "at most 1/2" in err and "or use --correlation-recipe threshold" in err


def test_package_metadata_matches_what_the_code_needs():
    # The code uses Python 3.11 (tomllib here, typing features elsewhere) and fused Adam on the
    # CPU (train/trainer.py), which arrived in torch 2.4.
    import re
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.11"
    torch_req = next(d for d in meta["dependencies"] if d.startswith("torch"))
    major, minor = map(int, re.search(r">=(\d+)\.(\d+)", torch_req).groups())
    assert (major, minor) >= (2, 4)
