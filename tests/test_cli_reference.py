"""docs/reference/cli.md is what the parsers say: regenerated, it is the committed page, so a
default or a meaning changed in the code without the page fails here (and the page names every
flag of every command).

    python -m unsuperpose.commands.cli_reference    # rewrites the page after a flag changed
"""

from __future__ import annotations

import argparse

from unsuperpose.commands import cli_reference
from unsuperpose.commands.cli import build_parser, parsers


def test_the_committed_reference_is_what_the_parsers_say():
    committed = cli_reference.PAGE.read_text()
    assert committed == cli_reference.render(), (
        f"{cli_reference.PAGE} differs from the parsers: run "
        "`python -m unsuperpose.commands.cli_reference` and commit the page"
    )


def test_every_flag_of_every_command_is_in_the_reference():
    page = cli_reference.PAGE.read_text()
    missing = []
    for path, sub, _ in parsers(build_parser()):
        if f"## `unsuperpose {' '.join(path)}`" not in page:
            missing.append(" ".join(path))
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or action.dest in cli_reference.EVERYWHERE:
                continue
            missing += [f"{' '.join(path)} {o}" for o in action.option_strings if o not in page]
    assert not missing


def test_a_documented_default_is_the_parsers(monkeypatch):
    """The page's default column comes from the parser: change one and the page changes."""
    parser = build_parser()
    sub = dict((p, s) for p, s, _ in parsers(parser))[("harvest",)]
    batch = next(a for a in sub._actions if a.dest == "batch_size")
    assert cli_reference.split_default(batch, batch.help)[1] == str(batch.shown_default)
    n_ctx = next(a for a in sub._actions if a.dest == "n_ctx")
    assert cli_reference.split_default(n_ctx, n_ctx.help)[1] == "the model's context length"
    monkeypatch.setattr(cli_reference, "build_parser", lambda: _changed(parser))
    assert cli_reference.render() != cli_reference.PAGE.read_text()


def _changed(parser):
    sub = dict((p, s) for p, s, _ in parsers(parser))[("harvest",)]
    next(a for a in sub._actions if a.dest == "n_ctx").default = 512
    return parser
