"""`unsuperpose demo` without running the pipeline: the steps it plans, in order, and resuming by
skipping the steps whose output is complete (the full demo takes ~20 minutes, see README)."""

import json

import pytest

from unsuperpose.cli import build_parser
from unsuperpose.commands import demo
from unsuperpose.errors import UserError


def fake_outputs(runs, step):
    """What each subcommand leaves once finished, reduced to what the completeness checks read."""
    if step.name == "tiny LM":
        step.output.mkdir(parents=True, exist_ok=True)
        (step.output / "model.safetensors").write_bytes(b"")
    elif step.name.startswith("harvest"):
        step.output.mkdir(parents=True, exist_ok=True)
        (step.output / "zarr.json").write_text(json.dumps({"attributes": {"complete": True}}))
    elif step.name in ("SAE grid", "toy replication"):
        step.output.mkdir(parents=True, exist_ok=True)
        (step.output / "summary.csv").write_text("l1\n")


def run_demo(runs, monkeypatch, *extra):
    ran = []
    steps = {tuple(s.argv): s for s in demo.plan(runs, "--quick" in extra, progress=False)}

    def fake_main(argv):
        ran.append(argv[:2])
        fake_outputs(runs, steps[tuple(argv)])
        return 0

    monkeypatch.setattr(demo, "cli_main", fake_main)
    args = build_parser().parse_args(["demo", "--runs", str(runs), "--no-progress", *extra])
    assert args.func(args) == 0
    return ran


def test_the_demo_runs_the_pipeline_in_order_and_ends_with_the_report(tmp_path, monkeypatch, capsys):
    ran = run_demo(tmp_path, monkeypatch)
    assert ran == [["lm", "train"], ["harvest", "--lm"], ["train", "--store"], ["toy", "--out"],
                   ["analyze", "report"]]
    out = capsys.readouterr().out
    assert "report:" in out and out.strip().endswith("index.html")
    assert "total" in out


def test_a_rerun_skips_every_complete_step_but_the_report(tmp_path, monkeypatch, capsys):
    run_demo(tmp_path, monkeypatch)
    assert run_demo(tmp_path, monkeypatch) == [["analyze", "report"]]
    assert capsys.readouterr().out.count("skipped") >= 8


def test_an_unfinished_grid_is_run_again_so_it_resumes(tmp_path, monkeypatch):
    run_demo(tmp_path, monkeypatch, "--quick")
    grid = demo.plan(tmp_path, True)[2].output
    (grid / demo.CHECKPOINT_DIR).mkdir()
    assert run_demo(tmp_path, monkeypatch, "--quick") == [["train", "--store"], ["analyze", "report"]]


def test_the_steps_feed_each_other(tmp_path):
    lm, harvest, train, toy, report = demo.plan(tmp_path)
    assert harvest.argv[harvest.argv.index("--lm") + 1] == str(lm.output)
    assert train.argv[train.argv.index("--store") + 1] == str(harvest.output)
    assert train.output.name == train.argv[train.argv.index("--dict") + 1].replace(",", "+")
    assert report.output == tmp_path / "report" / "tiny-layer1" / "index.html"
    # Every command line parses with the real CLI.
    for step in (lm, harvest, train, toy, report):
        build_parser().parse_args(step.argv)


def test_a_failing_step_stops_the_demo_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "cli_main", lambda argv: 2)
    args = build_parser().parse_args(["demo", "--runs", str(tmp_path)])
    with pytest.raises(UserError, match="tiny LM.*rerun the same command"):
        args.func(args)
