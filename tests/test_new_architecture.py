"""An architecture defined in this file alone, through the public API: the proof that adding one
needs no edit of the package.

``fixed-threshold``: an SAE whose codes are its pre-activations where they exceed a fixed
threshold THETA and 0 elsewhere (a JumpReLU whose threshold is not learnt), with an L1 penalty
on the codes. Its knob is new too (``penalty``, flag ``--penalty``). Registered, it trains as a
grid from the command line (``unsuperpose toy`` and ``unsuperpose train``), evaluates, saves,
loads back with ``load_dictionary``, is read by ``analyze report``, and the SAELens export
refuses it with the reason its record gives.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from unsuperpose.cli import main
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train import (
    AffineSAE,
    Family,
    Knob,
    SAETrainConfig,
    StackedGroup,
    evaluate,
    load_dictionary,
    load_saes,
    new_state,
    register,
    save_grid,
    train_steps,
    unregister,
)
from unsuperpose.train.saelens import export_saelens

ARCH = "fixed-threshold"
THETA = 0.05


class FixedThresholdSAE(AffineSAE):
    """codes = pre * (pre > threshold), the threshold read from the saved config."""

    arch = ARCH

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.config["threshold"])


class FixedThresholdGroup(StackedGroup):
    """S of them, one per penalty; trained by autograd (the straight mask passes gradients
    only where a code is kept)."""

    arch = ARCH
    dictionary_class = FixedThresholdSAE

    def init_extra(self) -> dict[str, torch.Tensor]:
        self.penalty = torch.tensor(self.values, dtype=torch.float32, device=self.device)
        return {}

    def codes(self, pre: torch.Tensor, training: bool) -> torch.Tensor:
        return pre * (pre > THETA)

    def extra_loss(self, x, pre, codes, x_hat, err, dn) -> torch.Tensor:
        return self.penalty * codes.sum(-1).mean(0)

    def dictionary_config(self, s: int) -> dict:
        return {"threshold": THETA}


PENALTY = Knob(
    name="penalty",
    type=float,
    flag="--penalty",
    label="penalty",
    defaults=(1e-3,),
    denser_when_larger=False,
    help="L1 penalties on the thresholded codes, comma-separated",
)
FAMILY = Family(
    name=ARCH,
    knob=PENALTY,
    group=FixedThresholdGroup,
    dictionary=FixedThresholdSAE,
    source="this test",
    saelens_refusal="SAELens has no JumpReLU whose threshold is fixed at export time here",
)
PENALTIES = [1e-3, 1e-2]


@pytest.fixture(scope="module")
def registered():
    register(FAMILY)
    yield FAMILY
    unregister(ARCH)


def test_the_api_trains_evaluates_saves_and_loads_it_back(registered, tmp_path, one_torch_thread):
    src = ToySource(ToyConfig(h=16, G=32, k=2, decay=0.95, seed=0))
    cfg = SAETrainConfig(
        arch=ARCH, sparsity=PENALTIES, dict_sizes=[16, 32], steps=40, batch_size=64, log_every=10
    )
    assert cfg.family is registered and not cfg.fitted
    state = train_steps(new_state(src, cfg), src, progress=False)
    metrics = evaluate(state, src)
    assert set(metrics) == {(v, n) for v in PENALTIES for n in (16, 32)}
    rows = save_grid(state, metrics, tmp_path)
    assert {(r["arch"], r["sparsity_name"]) for r in rows} == {(ARCH, "penalty")}
    folder = tmp_path / "saes" / f"{ARCH}-n16-penalty_0.001"
    assert type(load_dictionary(folder)) is FixedThresholdSAE
    x = next(src.batches(64, seed=99))
    loaded = load_saes(tmp_path)
    for g in state.groups:
        codes, x_hat = g.reconstruct(x)
        for s, v in enumerate(g.values):
            d = loaded[(v, g.n)]
            torch.testing.assert_close(d.encode(x), codes[:, s], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(d.decode(codes[:, s]), x_hat[s], atol=1e-5, rtol=1e-4)
            assert bool(((d.encode(x) == 0) | (d.encode(x) > THETA)).all())
    with pytest.raises(ValueError, match=f"no SAELens export for architecture '{ARCH}': SAELens"):
        export_saelens(loaded[(1e-3, 16)], tmp_path / "saelens")


def test_its_knob_is_a_flag_and_a_wrong_one_is_refused(registered, tmp_path, capsys):
    code = main(["toy", "--arch", ARCH, "--topk", "3", "--out", str(tmp_path / "never")])
    assert code != 0
    err = capsys.readouterr().err
    assert f"--topk is not a knob of --arch {ARCH}; its knob is --penalty" in err


def _toy_grid(out):
    toy = ["toy", "--h", "16", "--g", "32", "--k", "2", "--decay", "0.95", "--seed", "0"]
    grid = ["--arch", ARCH, "--penalty", "1e-3,1e-2", "--dict-sizes", "1x,2x"]
    run = ["--steps", "100", "--batch-size", "64", "--log-every", "10", "--eval-every", "50"]
    return main([*toy, *grid, *run, "--out", str(out), "--no-progress", "--wandb", "disabled"])


def test_the_commands_train_it_and_the_report_reads_it(
    registered, analyze_runs, tmp_path, capsys, one_torch_thread
):
    assert _toy_grid(tmp_path / "toy") == 0
    with open(tmp_path / "toy" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["arch"], r["sparsity_name"]) for r in rows} == {(ARCH, "penalty")}
    assert len(rows) == 4 and all(float(r["heldout_fvu"]) < 2 for r in rows)
    assert "penalty" in capsys.readouterr().out  # the best dictionary, named by its knob

    runs = tmp_path / "runs"  # the shared fixture's tree stays as the other tests expect it
    shutil.copytree(analyze_runs, runs)
    store = runs / "acts" / "tiny" / "layer1.zarr"
    train = ["train", "--store", str(store), "--arch", ARCH, "--penalty", "1e-3,1e-2"]
    grid = ["--dict-sizes", "1x,2x", "--steps", "60", "--batch-size", "64", "--log-every", "20"]
    rest = ["--dead-window", "20", "--splice-tokens", "64", "--no-progress", "--wandb", "disabled"]
    out = runs / "sae" / "tiny" / "layer1"
    assert main([*train, *grid, *rest, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"no SAELens export for {ARCH}: {FAMILY.saelens_refusal}" in said
    grid_dir = out / f"{ARCH}-1x+2x"
    assert not (grid_dir / "saelens").exists()
    folder = grid_dir / "saes" / f"{ARCH}-n128-penalty_0.01"
    assert type(load_dictionary(folder)) is FixedThresholdSAE

    report = tmp_path / "report"
    args = ["analyze", "report", "--runs", str(runs), "--lm", "tiny", "--layer", "1"]
    args += ["--arch", ARCH, "--toy", str(tmp_path / "toy"), "--out", str(report)]
    assert main([*args, "--no-progress", "--top", "5"]) == 0
    record = json.loads((report / "diagnosis.json").read_text())
    assert record["lm"]["base"] == 64 and record["toy"]["base"] == 32
    html = (report / "index.html").read_text()
    assert "penalty" in html and f"--arch {ARCH}" in html
