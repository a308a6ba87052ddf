"""`--help` says each default once, and truly.

Every subcommand's help is read flag by flag: no default said twice ("(default: X)" after a help
that says its default already), none said as "(default: None)", and a hand-written
"(default: X)" naming a value names the parser's. The cases found wrong are checked by name:
`lm train --preset` (its tokens and threads come from the presets), the corpus flags of
`harvest` (unset, the model's recorded corpus, not wiki and 0.05).
"""

from __future__ import annotations

import argparse
import re

import pytest

from unsuperpose.commands.cli import build_parser, parsers
from unsuperpose.lm import PRESETS

SAYS_DEFAULT = re.compile(r"\(default\b|[;,]\s*(the )?default\b|\bby default\b", re.IGNORECASE)
PARSER = build_parser()
COMMANDS = {" ".join(path): sub for path, sub, _ in parsers(PARSER)}


def _helps(sub: argparse.ArgumentParser):
    formatter = sub.formatter_class(prog=sub.prog)
    for action in sub._actions:
        if action.help and action.help != argparse.SUPPRESS and action.option_strings:
            yield action, " ".join(formatter._expand_help(action).split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_flag_says_its_default_at_most_once_and_never_none(command):
    doubled = [
        f"{a.option_strings[0]}: {text}"
        for a, text in _helps(COMMANDS[command])
        if len(SAYS_DEFAULT.findall(text)) > 1 or "(default: None)" in text
    ]
    assert not doubled


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_default_named_as_a_value_is_the_parsers(command):
    wrong = []
    for action, text in _helps(COMMANDS[command]):
        m = re.search(r"\(default: (\S+)\)$", text)
        if not m:
            continue
        if action.default is argparse.SUPPRESS:  # a config flag: the value it shows
            truth = getattr(action, "shown_default", None)
        else:
            truth = action.default
        if truth is None:  # None: the help says in words what happens (e.g. "all")
            continue
        shown = {str(truth), ",".join(map(str, truth)) if isinstance(truth, list) else None}
        if m.group(1) not in shown:
            wrong.append(f"{action.option_strings[0]} says {m.group(1)}, is {truth!r}")
    assert not wrong


def test_the_help_text_of_every_command_renders():
    for sub in COMMANDS.values():
        assert sub.format_help()


def test_lm_train_preset_says_what_each_preset_trains():
    action = next(a for a in COMMANDS["lm train"]._actions if a.dest == "preset")
    text = " ".join(COMMANDS["lm train"].formatter_class("x")._expand_help(action).split())
    for name, (lm, train) in PRESETS.items():
        assert f"{name} = {lm.n_layer} layers x d_model {lm.d_model}" in text
        assert f"{train.tokens:,} tokens" in text
    assert "1 thread" not in text and "1M tokens" not in text


def test_harvest_corpus_flags_default_to_the_models_recorded_corpus():
    helps = {a.dest: text for a, text in _helps(COMMANDS["harvest"])}
    for dest in ("corpus", "val_fraction", "seed", "text_field"):
        assert helps[dest].endswith("(default: the model's recorded corpus settings)"), dest
    assert "(default: wiki)" not in helps["corpus"] and "0.05" not in helps["val_fraction"]
