"""`unsuperpose demo` without running the pipeline: the steps it plans, in order, and resuming by
skipping the steps whose output is complete (the full demo takes ~20 minutes, see README)."""

import json

import pytest

from unsuperpose.analyze import growth
from unsuperpose.cli import build_parser
from unsuperpose.commands import demo, demo_plan
from unsuperpose.errors import UserError
from unsuperpose.train.layout import CHECKPOINT_DIR


def complete_store(path):
    """A store's zarr.json as a harvest that ran to the end leaves it (its progress)."""
    path.mkdir(parents=True, exist_ok=True)
    progress = dict(rows_planned=8, rows_written=8, complete=True, chunk_rows=8, batch_size=8)
    (path / "zarr.json").write_text(json.dumps({"attributes": progress}))


def fake_outputs(runs, step, dead_at=None, stragglers=False):
    """What each subcommand leaves once finished, reduced to what the completeness checks read.
    ``dead_at``: the smallest dictionary size that loses 5% of its latents (None: none ever die);
    ``stragglers``: one dead latent per 1,000 in every other dictionary (none below 1,000
    latents, 1 of 1,024)."""
    if step.name == "tiny LM":
        step.output.mkdir(parents=True, exist_ok=True)
        (step.output / "model.safetensors").write_bytes(b"")
    elif step.name.startswith("harvest"):
        complete_store(step.output)
    elif step.name.startswith("SAE grid"):
        step.output.mkdir(parents=True, exist_ok=True)
        spec = step.argv[step.argv.index("--dict-sizes") + 1]
        sizes = [int(float(r.rstrip("x")) * 64) for r in spec.split(",")]

        def dead(n):
            return n // 20 if dead_at is not None and n >= dead_at else stragglers * (n // 1000)

        rows = [f"{a},{n},{dead(n)}" for a in (1e-3, 1e-2) for n in sizes]
        (step.output / "summary.csv").write_text("l1,dict_size,dead\n" + "\n".join(rows) + "\n")
        (step.output / "train_config.json").write_text("{}")
    elif step.name == "toy replication":
        step.output.mkdir(parents=True, exist_ok=True)
        (step.output / "summary.csv").write_text("l1\n")
        (step.output / "train_config.json").write_text("{}")


def run_demo(runs, monkeypatch, *extra, dead_at=128, stragglers=False):
    ran = []
    steps = {tuple(s.argv): s for s in demo_plan.plan(runs, "--quick" in extra, progress=False)}

    def fake_main(argv):
        sizes = [argv[argv.index("--dict-sizes") + 1]] if argv[0] == "train" else []
        ran.append(argv[:2] + sizes)
        fake_outputs(runs, steps[tuple(argv)], dead_at, stragglers)
        return 0

    monkeypatch.setattr(demo, "cli_main", fake_main)
    args = build_parser().parse_args(["demo", "--runs", str(runs), "--no-progress", *extra])
    assert args.func(args) == 0
    return ran


def test_the_demo_runs_the_pipeline_in_order_and_ends_with_the_report(
    tmp_path, monkeypatch, capsys
):
    ran = run_demo(tmp_path, monkeypatch)
    assert ran == [
        ["lm", "train"],
        ["harvest", "--lm"],
        ["train", "--store", "1x,2x,4x,8x"],
        ["toy", "--out"],
        ["analyze", "report"],
    ]
    out = capsys.readouterr().out
    assert "report:" in out and out.strip().endswith("index.html")
    assert "total" in out


def test_a_rerun_skips_every_complete_step_but_the_report(tmp_path, monkeypatch, capsys):
    run_demo(tmp_path, monkeypatch)
    assert run_demo(tmp_path, monkeypatch) == [["analyze", "report"]]
    assert capsys.readouterr().out.count("skipped") >= 8


def test_an_unfinished_grid_is_run_again_so_it_resumes(tmp_path, monkeypatch):
    run_demo(tmp_path, monkeypatch, "--quick")
    grid = demo_plan.plan(tmp_path, True)[2].output
    (grid / CHECKPOINT_DIR).mkdir()
    assert run_demo(tmp_path, monkeypatch, "--quick") == [
        ["train", "--store", "1x,2x,4x"],
        ["analyze", "report"],
    ]


def test_the_steps_feed_each_other(tmp_path):
    lm, harvest, train, *grow, toy, report = demo_plan.plan(tmp_path)
    assert [g.output.name for g in grow] == ["16x", "32x"] and all(g.grow for g in grow)
    assert all(
        g.argv[g.argv.index("--l1") + 1] == train.argv[train.argv.index("--l1") + 1] for g in grow
    )
    assert harvest.argv[harvest.argv.index("--lm") + 1] == str(lm.output)
    assert train.argv[train.argv.index("--store") + 1] == str(harvest.output)
    assert train.output.name == train.argv[train.argv.index("--dict-sizes") + 1].replace(",", "+")
    assert report.output == tmp_path / "report" / "tiny-layer1" / "index.html"
    # Every command line parses with the real CLI.
    for step in (lm, harvest, train, *grow, toy, report):
        build_parser().parse_args(step.argv)


def test_a_failing_step_stops_the_demo_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "cli_main", lambda argv: 2)
    args = build_parser().parse_args(["demo", "--runs", str(tmp_path)])
    with pytest.raises(UserError, match="tiny LM.*rerun the same command"):
        args.func(args)


def test_the_lm_grid_grows_until_dead_latents_appear_and_says_so(tmp_path, monkeypatch, capsys):
    # dead latents only from 1,024 latents (16x of d = 64): 16x is trained, 32x is not needed
    ran = run_demo(tmp_path, monkeypatch, dead_at=1024)
    trained = [r[2] for r in ran if r[0] == "train"]
    assert trained == ["1x,2x,4x,8x", "16x"]
    out = capsys.readouterr().out
    assert (
        "growing the grid to 16x" in out
        and "the largest dictionary has dead latents at every L1" in out
    )


def test_the_growth_follows_the_default_dead_neuron_reading(tmp_path, monkeypatch, capsys):
    # One dead latent of 1,024 (16x): under the report's literal rule, the default, 16x has dead
    # latents and the growth stops there; read with a 1% tolerance it passes and the grid grows.
    ran = run_demo(tmp_path / "literal", monkeypatch, dead_at=None, stragglers=True)
    assert [r[2] for r in ran if r[0] == "train"] == ["1x,2x,4x,8x", "16x"]
    assert "the largest dictionary has dead latents at every L1" in capsys.readouterr().out
    monkeypatch.setattr(growth, "DEFAULT_TOLERANCE", 0.01)
    ran = run_demo(tmp_path / "tolerant", monkeypatch, dead_at=None, stragglers=True)
    assert [r[2] for r in ran if r[0] == "train"] == ["1x,2x,4x,8x", "16x", "32x"]
    assert "keeps at least 99.0% of its latents" in capsys.readouterr().out


def test_when_no_latent_ever_dies_the_demo_says_the_budget_ended_first(
    tmp_path, monkeypatch, capsys
):
    ran = run_demo(tmp_path, monkeypatch, dead_at=None)
    assert [r[2] for r in ran if r[0] == "train"] == ["1x,2x,4x,8x", "16x", "32x"]
    assert "the budget ended before its latents died there" in capsys.readouterr().out


def test_the_demo_prints_the_reports_estimate_or_no_estimate_with_its_reasons(tmp_path, capsys):
    steps = demo_plan.plan(tmp_path, quick=False)
    report = next(s for s in steps if s.name == "report")
    report.output.parent.mkdir(parents=True)
    rule = {"window": 148, "steps": 250, "steps_needed": 296}
    estimate = {"no_estimate": ["the grid trained 250 steps; train at least 296 steps"]}
    lm = {"base": 64, "estimate": estimate, "window_rule": rule}
    (report.output.parent / "diagnosis.json").write_text(json.dumps({"lm": lm}))
    text = demo.report_estimate(steps)
    assert "no estimate: the grid trained 250 steps; train at least 296 steps" in text
    assert "148 batches; 250 steps trained, 296 needed" in text
    assert "\n" not in text  # no calibration line in a diagnosis without one
    lm["default_reading"] = {"calibration_text": "On toy data ... 8 of 8 calibration grids."}
    (report.output.parent / "diagnosis.json").write_text(json.dumps({"lm": lm}))
    assert demo.report_estimate(steps).endswith(
        "296 needed.\nOn toy data ... 8 of 8 calibration grids."
    )


def test_quick_writes_to_its_own_folder_and_a_quick_lm_is_never_taken_for_the_full_one(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["demo", "--quick"])
    assert args.runs is None  # resolved to runs/quick by the command
    lm = demo_plan.plan(tmp_path, quick=False)[0]
    lm.output.mkdir(parents=True)
    (lm.output / "model.safetensors").write_bytes(b"")
    (lm.output / "lm_config.json").write_text(json.dumps({"extra": {"train": {"tokens": 65_536}}}))
    with pytest.raises(UserError, match="65,536 tokens, not the 2,500,000"):
        lm.done()


def test_the_update_replication_is_layer_3_with_1x_to_32x_beside_the_full_toy_grid(tmp_path):
    lm, harvest, train, toy, report = demo_plan.plan(tmp_path, update=True)
    assert harvest.argv[harvest.argv.index("--layer") + 1] == "3" and "--tokens" not in harvest.argv
    assert train.argv[train.argv.index("--dict-sizes") + 1] == "1x,2x,4x,8x,16x,32x"
    assert train.argv[train.argv.index("--steps") + 1] == "10000"
    assert toy.output == tmp_path / "toy" and "--l1" not in toy.argv  # `make toy`'s own grid
    assert report.argv[report.argv.index("--layer") + 1] == "3"
    for step in (lm, harvest, train, toy, report):
        build_parser().parse_args(step.argv)


def test_make_demo_quick_leaves_the_folder_to_the_demo():
    # `make demo` used to pass --runs runs always, so `make demo ARGS=--quick` wrote into the
    # full demo's folder (and was refused there); RUNS=... given by the user still wins.
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("no make")
    repo = Path(__file__).parents[1]

    def dry(*args):
        out = subprocess.run(
            ["make", "-n", "-C", str(repo), "demo", *args],
            capture_output=True,
            text=True,
            env={k: v for k, v in __import__("os").environ.items() if k != "RUNS"},
        )
        return next(line for line in out.stdout.splitlines() if "unsuperpose demo" in line)

    assert "--runs" not in dry("ARGS=--quick") and "--quick" in dry("ARGS=--quick")
    assert "--runs /tmp/elsewhere" in dry("RUNS=/tmp/elsewhere")


def test_make_real_runs_the_smollm2_demo_offline_and_full_is_one_flag_away():
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("no make")
    repo = Path(__file__).parents[1]

    def dry(*args):
        out = subprocess.run(
            ["make", "-n", "-C", str(repo), "real", *args], capture_output=True, text=True
        )
        return next(line for line in out.stdout.splitlines() if "unsuperpose demo" in line)

    assert "HF_HUB_OFFLINE=1" in dry() and "demo --lm smollm2" in dry()
    assert "--full" in dry("ARGS=--full")


def test_the_smollm2_demo_adopts_harvests_layer_2_trains_every_method_and_reports(tmp_path):
    steps = demo_plan.plan(tmp_path, lm="smollm2")
    adopt, harvest, grid, topk, neurons, pca, report, methods = steps
    assert adopt.argv[:4] == ["lm", "adopt", "--from", "smollm2"]
    arg = {s.name: dict(zip(s.argv, s.argv[1:], strict=False)) for s in steps}
    assert arg["harvest layer 2"]["--lm"] == str(adopt.output)
    assert arg["harvest layer 2"]["--layer"] == "2" and arg["harvest layer 2"]["--n-ctx"] == "256"
    assert "--tokens" not in harvest.argv  # the whole embedded corpus
    assert harvest.output == tmp_path / "acts" / "smollm2" / "layer2.zarr"
    for step in (grid, topk, neurons, pca):
        a = arg[step.name]
        assert a["--store"] == str(harvest.output)
        # the same tokens for all
        assert a["--splice-tokens"] == str(demo_plan.REAL["splice_tokens"])
        assert step.output.parent == tmp_path / "sae" / "smollm2" / "layer2"
    # the report's ReLU grid: short, at the default batch
    assert arg["SAE grid"]["--l1"] == "1e-4,3e-4,1e-3" and grid.output.name == "0.5x+1x+2x"
    assert arg["SAE grid"]["--steps"] == "250" and "--batch-size" not in grid.argv
    # TopK through its fast path at k spanning L0 16..128, for the run's training budget
    assert arg["TopK SAEs"]["--arch"] == "topk" and topk.output.name == "topk-4x"
    assert arg["TopK SAEs"]["--topk"] == "16,32,64,128"
    assert int(arg["TopK SAEs"]["--steps"]) * int(arg["TopK SAEs"]["--batch-size"]) > 10**6
    assert arg["neuron basis"]["--arch"] == "neurons" and neurons.output.name == "neurons-1x"
    assert arg["PCA"]["--arch"] == "pca" and pca.output.name == "pca-1x"
    # the baselines at the TopK grid's k (matched L0 on the methods page), and dense
    assert arg["neuron basis"]["--topk"] == arg["PCA"]["--topk"] == "16,32,64,128,all"
    assert report.argv[:2] == ["analyze", "report"] and methods.argv[:2] == ["analyze", "methods"]
    for step in (report, methods):
        assert arg[step.name]["--lm"] == "smollm2" and arg[step.name]["--layer"] == "2"
    assert report.output == tmp_path / "report" / "smollm2-layer2" / "index.html"
    assert methods.output == tmp_path / "report" / "smollm2-layer2-methods" / "index.html"
    for step in steps:
        build_parser().parse_args(step.argv)


def test_the_smollm2_quick_and_full_runs_differ_only_in_size(tmp_path):
    quick = demo_plan.plan(tmp_path, quick=True, lm="smollm2")
    full = demo_plan.plan(tmp_path, lm="smollm2", full=True)
    assert [s.name for s in quick] == [s.name for s in demo_plan.plan(tmp_path, lm="smollm2")]
    assert [s.name for s in full if s.grow] == ["SAE grid, grown to 32x"]
    harvest = next(s for s in full if s.name.startswith("harvest"))
    assert "--tokens" not in harvest.argv  # the whole corpus
    grid = next(s for s in full if s.name == "SAE grid")
    assert grid.argv[grid.argv.index("--dict-sizes") + 1] == "1x,2x,4x,8x,16x"
    assert grid.argv[grid.argv.index("--steps") + 1] == "10000"
    # the smoke run stays a smoke run: a small store, every training step a few thousand rows
    qharvest = next(s for s in quick if s.name.startswith("harvest"))
    assert int(qharvest.argv[qharvest.argv.index("--tokens") + 1]) <= 16_384
    for step in quick:
        if step.argv[0] == "train":
            a = dict(zip(step.argv, step.argv[1:], strict=False))
            assert int(a["--steps"]) * int(a.get("--batch-size", 256)) <= 16_384, step.name
    for step in quick + full:
        build_parser().parse_args(step.argv)


def test_the_smollm2_demo_runs_in_order_resumes_and_refuses_another_model(
    tmp_path, monkeypatch, capsys
):
    steps = {tuple(s.argv): s for s in demo_plan.plan(tmp_path, lm="smollm2", progress=False)}
    ran = []

    def fake_main(argv):
        step = steps[tuple(argv)]
        ran.append(step.name)
        step.output.mkdir(parents=True, exist_ok=True)
        if step.name.startswith("adopt"):
            (step.output / "model.safetensors").write_bytes(b"")
            meta = {"extra": {"adopted_from": "smollm2"}}
            (step.output / "lm_config.json").write_text(json.dumps(meta))
        elif step.name.startswith("harvest"):
            complete_store(step.output)
        elif step.name == "SAE grid":  # 2x (3,072 latents) loses latents at every L1
            rows = [
                f"relu,{a},{n},{n // 20 * (n > 1536)}" for a in (3e-4, 3e-3) for n in (768, 3072)
            ]
            (step.output / "summary.csv").write_text("arch,l1,dict_size,dead\n" + "\n".join(rows))
            (step.output / "train_config.json").write_text("{}")
        elif step.name in ("TopK SAEs", "neuron basis", "PCA"):  # never read as the ReLU grid
            arch = step.argv[step.argv.index("--arch") + 1]
            (step.output / "summary.csv").write_text(
                f"arch,top_k,dict_size,dead\n{arch},16,1536,0\n"
            )
            (step.output / "train_config.json").write_text("{}")
        return 0

    monkeypatch.setattr(demo, "cli_main", fake_main)
    argv = ["demo", "--lm", "smollm2", "--runs", str(tmp_path), "--no-progress"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    assert ran == [
        "adopt smollm2",
        "harvest layer 2",
        "SAE grid",
        "TopK SAEs",
        "neuron basis",
        "PCA",
        "report",
        "methods",
    ]
    out = capsys.readouterr().out
    assert "has dead latents at every L1" in out and "methods: " in out and "load" in out
    ran.clear()
    assert args.func(args) == 0 and ran == ["report", "methods"]
    meta = {"extra": {"adopted_from": "gguf:/elsewhere.gguf"}}
    (tmp_path / "lm" / "smollm2" / "lm_config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="holds another model"):
        args.func(args)


def test_full_is_only_for_the_real_model_and_update_only_for_the_tiny_one(tmp_path):
    for argv, match in (
        (["--full"], "--full is the full-size run of --lm smollm2"),
        (["--lm", "smollm2", "--update"], "--update is the tiny LM's experiment"),
        (["--lm", "smollm2", "--full", "--quick"], "choose one"),
    ):
        args = build_parser().parse_args(["demo", "--runs", str(tmp_path), *argv])
        with pytest.raises(UserError, match=match):
            args.func(args)
