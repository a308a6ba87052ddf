"""W&B on every long-running command: --wandb, --wandb-project and --wandb-entity, set for the
command's whole run (so the stages a demo runs in-process see them too) and restored after;
unset, W&B's own $WANDB_MODE (else offline), $WANDB_PROJECT (else "unsuperpose") and
$WANDB_ENTITY. The tracker is checked against a stand-in for wandb.init: nothing is sent.
"""

from __future__ import annotations

import argparse
import os
import types

import pytest
import wandb

from unsuperpose import tracking
from unsuperpose.cli import main
from unsuperpose.commands import cli, harvest
from unsuperpose.tracking import Tracker

FLAGS = ["--wandb", "online", "--wandb-project", "proj", "--wandb-entity", "team"]


@pytest.mark.parametrize("names", cli.LONG_RUNNING, ids=" ".join)
def test_every_long_running_command_takes_the_three_flags(names):
    parser = cli.subparser(cli.build_parser(), *names)
    flags = {opt for a in parser._actions for opt in a.option_strings}
    assert {"--wandb", "--wandb-project", "--wandb-entity"} <= flags
    wandb_action = next(a for a in parser._actions if a.dest == "wandb")
    assert set(wandb_action.choices) == {"offline", "online", "disabled"}
    # unset: $WANDB_MODE, else offline (lm train's config flags default to "not given")
    assert wandb_action.default in (None, argparse.SUPPRESS)


def test_the_flags_hold_for_the_run_and_are_restored(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_ENTITY", "before")
    seen = {}

    def run(args):
        seen.update({k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY")})
        return 0

    monkeypatch.setattr(harvest, "run", run)
    assert main(["harvest", "--lm", "m", "--out", str(tmp_path), *FLAGS]) == 0
    assert seen == {"WANDB_MODE": "online", "WANDB_PROJECT": "proj", "WANDB_ENTITY": "team"}
    assert os.environ["WANDB_MODE"] == "disabled"  # tests/conftest.py's, restored
    assert "WANDB_PROJECT" not in os.environ and os.environ["WANDB_ENTITY"] == "before"
    assert main(["harvest", "--lm", "m", "--out", str(tmp_path)]) == 0  # unset: left as they are
    assert seen == {"WANDB_MODE": "disabled", "WANDB_PROJECT": None, "WANDB_ENTITY": "before"}


@pytest.fixture
def inits(monkeypatch):
    """wandb.init replaced by a recorder of its arguments."""
    calls = []

    def init(**kw):
        calls.append(kw)
        return types.SimpleNamespace(id="r1", log=lambda *a, **k: None, finish=lambda **k: None)

    monkeypatch.setattr(wandb, "init", init)
    return calls


def test_the_tracker_reads_the_project_and_entity_from_wandbs_variables(
    inits, monkeypatch, tmp_path
):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    Tracker(tmp_path / "a", mode="offline").finish()
    assert inits[-1]["project"] == "unsuperpose" and inits[-1]["entity"] is None
    assert inits[-1]["mode"] == "offline"
    with tracking.wandb_env(project="from-env", entity="team"):
        Tracker(tmp_path / "b", mode="offline").finish()
    assert inits[-1]["project"] == "from-env" and inits[-1]["entity"] == "team"
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    Tracker(tmp_path / "c", mode="offline").finish()
    assert inits[-1]["project"] == "env-project"
    Tracker(tmp_path / "d", mode="offline", project="given").finish()
    assert inits[-1]["project"] == "given"


def test_offline_stays_the_default_and_online_only_when_asked(inits, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    Tracker(tmp_path / "a").finish()
    assert inits[-1]["mode"] == "offline"
    with tracking.wandb_env(mode="online"):
        Tracker(tmp_path / "b").finish()
    assert inits[-1]["mode"] == "online"
    assert "WANDB_MODE" not in os.environ
