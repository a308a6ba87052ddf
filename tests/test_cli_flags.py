"""One meaning per flag: sizes are --dict-sizes in train and toy, a saved
dictionary is --dictionary, force is --force, the corpus's split seed is --split-seed, flags are
lower-case. Each old spelling still parses to what the new one does, warns naming the new one
(a FlagDeprecation, a FutureWarning), and the reference lists both; `make train DICT=8x` and
`make harvest LAYER=1` keep working.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from unsuperpose.commands import cli_reference
from unsuperpose.commands.cli import build_parser, parsers
from unsuperpose.commands.flags import FlagDeprecation

ROOT = Path(__file__).resolve().parent.parent
PARSER = build_parser()
COMMANDS = {" ".join(path): sub for path, sub, _ in parsers(PARSER)}
# A value each old spelling is given (None: a switch).
VALUES = {"--dict-ratios": "1x,2x", "--G": "64", "--dict": "8x", "--overwrite": None, "--seed": "3"}
ALIASES = [(c, o, n) for c, sub in COMMANDS.items() for o, n in getattr(sub, "deprecated", [])]
EXPECTED = {
    ("toy", "--dict-ratios", "--dict-sizes"),
    ("toy", "--G", "--g"),
    ("train", "--dict", "--dict-sizes"),
    ("analyze features", "--dict", "--dictionary"),
    ("analyze splice", "--dict", "--dictionary"),
    ("lm train", "--overwrite", "--force"),
    ("harvest", "--seed", "--split-seed"),
}


def _required(sub: argparse.ArgumentParser, but: str) -> list[str]:
    """Dummy values for the flags ``sub`` requires, other than ``but``'s."""
    argv = []
    for action in sub._actions:
        required = action.required or getattr(action, "required_one_of", False)
        if required and but not in action.option_strings:
            argv += [action.option_strings[0], "x"]
    return argv


def test_the_renamed_flags_are_these():
    assert set(ALIASES) == EXPECTED


@pytest.mark.parametrize(("command", "old", "new"), ALIASES, ids=lambda v: str(v))
def test_an_old_spelling_parses_as_the_new_one_and_warns(command, old, new):
    sub = COMMANDS[command]
    value = [] if VALUES[old] is None else [VALUES[old]]
    with pytest.warns(FlagDeprecation, match=rf"{re.escape(old)} is deprecated; use {new}"):
        by_old = sub.parse_args([*_required(sub, new), old, *value])
    with warnings_as_errors():
        by_new = sub.parse_args([*_required(sub, new), new, *value])
    assert vars(by_old) == vars(by_new)


class warnings_as_errors:  # noqa: N801 (a context manager read as a phrase)
    """The new spelling warns of nothing."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", FlagDeprecation)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_a_required_flag_is_required_under_either_spelling(capsys):
    sub = COMMANDS["analyze splice"]
    with pytest.raises(SystemExit):
        sub.parse_args([])
    assert "--dictionary is required" in capsys.readouterr().err
    with pytest.warns(FlagDeprecation):
        assert str(sub.parse_args(["--dict", "d"]).dict_path) == "d"


def test_flags_are_lower_case_and_the_reference_names_old_and_new():
    page = cli_reference.PAGE.read_text()
    for command, sub in COMMANDS.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                assert option == option.lower(), f"{command} {option}"
    for _, old, new in ALIASES:
        assert f"`{old}` (now `{new}`)" in page and f"`{new}" in page


def test_sizes_and_dictionaries_are_spelled_one_way():
    for command in ("train", "toy"):
        assert "--dict-sizes" in COMMANDS[command]._option_string_actions
    for command in ("analyze features", "analyze splice"):
        assert "--dictionary" in COMMANDS[command]._option_string_actions


@pytest.mark.parametrize(
    ("target", "want"),
    [("train DICT=8x", "--dict-sizes 8x"), ("harvest LAYER=1", "--layer 1 --out runs/acts/tiny")],
)
def test_the_make_targets_pass_the_new_spellings(target, want):
    out = subprocess.run(
        ["make", "-n", "-W", ".venv/.installed", *target.split()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if "unsuperpose " + target.split()[0] in x)
    assert want in line


def test_splice_out_is_the_folder_it_writes_and_a_json_file_still_works(tmp_path):
    from unsuperpose.commands.analyze import splice_file

    d = tmp_path / "set"
    assert splice_file(None, d) == d / "splice.json"
    with warnings_as_errors():
        assert splice_file(tmp_path / "out", d, warn=True) == tmp_path / "out" / "splice.json"
    with pytest.warns(FlagDeprecation, match="--out is the folder splice.json is written into"):
        assert splice_file(tmp_path / "x.json", d, warn=True) == tmp_path / "x.json"
