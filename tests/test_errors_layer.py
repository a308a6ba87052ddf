"""Errors belong to their layer: stages raise their own exceptions in their own words, and the
command layer turns them into the one-line message that names its flags."""

from pathlib import Path

import pytest

from unsuperpose import distributed
from unsuperpose.commands.errors import flags_of, in_flags, stage_errors
from unsuperpose.errors import UserError
from unsuperpose.harvest import HarvestConfig, HarvestError, StoreError
from unsuperpose.lm import CorpusConfig, CorpusError, ModelError, RunExists
from unsuperpose.train.parallel import ShardingError, plan

STAGES = ("lm", "harvest", "toy", "train", "analyze")
ROOT = Path(__file__).resolve().parents[1]


def test_no_stage_imports_the_cli_error():
    offenders = [
        str(p.relative_to(ROOT))
        for stage in STAGES
        for p in sorted((ROOT / stage).rglob("*.py"))
        if "unsuperpose.errors" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_stage_errors_are_value_errors():
    from unsuperpose.analyze import BrowserError, GridError

    for kind in (ModelError, CorpusError, RunExists, StoreError, HarvestError, ShardingError):
        assert issubclass(kind, ValueError)
    assert issubclass(GridError, ValueError) and issubclass(BrowserError, ValueError)


def test_keywords_become_the_flags_that_set_them():
    flags = flags_of(HarvestConfig, CorpusConfig, n_ctx="--n-ctx")
    assert flags["batch_size"] == "--batch-size" and flags["val_fraction"] == "--val-fraction"
    assert in_flags("layer='7': this model has layers 0..2", flags) == (
        "--layer 7: this model has layers 0..2"
    )
    assert in_flags("continue it with precision='bf16', or force=True.", flags) == (
        "continue it with --precision bf16, or --force."
    )
    assert in_flags("of corpus='my file.txt', n_ctx=256; val_fraction=0.05", flags) == (
        "of --corpus 'my file.txt', --n-ctx 256; --val-fraction 0.05"
    )
    # only whole keywords of known settings, and nothing in other words
    assert (
        in_flags("my_layer=3, layers 0..2, the force", flags)
        == "my_layer=3, layers 0..2, the force"
    )
    assert in_flags("name it with text_field=NAME", flags) == "name it with --text-field NAME"
    assert in_flags("layer='7'", {}) == "layer='7'"


def test_stage_errors_become_one_user_error_naming_the_flag():
    with pytest.raises(UserError, match=r"^--parallel grid deals .* or use --parallel data$"):
        with stage_errors(ShardingError, {"mode": "--parallel"}):
            plan([16, 32, 64], "grid", rank=0, world_size=4)
    with pytest.raises(UserError, match=r"^x holds a trained model \(--out\)$"):
        with stage_errors(RunExists, hint=" (--out)"):
            raise RunExists("x holds a trained model")


def test_other_errors_keep_their_type_and_traceback():
    with pytest.raises(KeyError):
        with stage_errors((StoreError, HarvestError)):
            raise KeyError("a bug")
    with pytest.raises(ValueError, match="a plain one") as err:
        with stage_errors(StoreError):
            raise ValueError("a plain one")
    assert not isinstance(err.value, UserError)


def test_a_refusal_on_rank_0_is_raised_as_itself_on_the_others():
    assert distributed._refusal(StoreError("x")) is StoreError
    assert distributed._refusal(UserError("x")) is UserError
    assert distributed._refusal(ValueError("a bug")) is None  # not a stage's refusal
    assert distributed._refusal(RuntimeError("a bug")) is None
