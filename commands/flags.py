"""Old flag spellings kept for one release, each printing a warning that names the new one.

A flag means one thing across the commands: dictionary sizes are ``--dict-sizes`` in
``train`` and ``toy``, a saved dictionary is ``--dictionary``, force is ``--force``, the
corpus's split seed is ``--split-seed``, and flags are lower-case. The spellings they replace
still parse to the same value, with a warning on stderr (a ``FlagDeprecation``, a
FutureWarning, so Python shows it by default and a test can catch it):

    unsuperpose: warning: --dict-ratios is deprecated; use --dict-sizes (the old spelling goes
    after the next release)

``alias(parser, old, new)`` adds the old spelling of a flag defined as ``new``; ``rename(parser,
old, new)`` renames a flag made elsewhere (a config dataclass's field) and keeps the old one as
an alias. Each parser lists its aliases in ``parser.deprecated`` (the CLI reference prints them).
"""

from __future__ import annotations

import argparse
import warnings


class FlagDeprecation(FutureWarning):
    """An old flag spelling was used."""


_format = warnings.formatwarning


def _formatwarning(message, category, filename, lineno, line=None):  # noqa: ANN001
    if issubclass(category, FlagDeprecation):
        return f"unsuperpose: warning: {message}\n"
    return _format(message, category, filename, lineno, line)


warnings.formatwarning = _formatwarning


class _Deprecated(argparse.Action):
    """The old spelling: warns, then does what the new flag does, under the new flag's name."""

    def __init__(self, option_strings, dest, target: argparse.Action, new: str, **kw):
        super().__init__(option_strings, dest, **kw)
        self.target, self.new = target, new

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(
            f"{option_string} is deprecated; use {self.new} "
            "(the old spelling goes after the next release)",
            FlagDeprecation,
            stacklevel=2,
        )
        self.target(parser, namespace, values, self.new)


def _action(parser: argparse.ArgumentParser, option: str) -> argparse.Action:
    try:
        return parser._option_string_actions[option]
    except KeyError:
        raise ValueError(f"{parser.prog} has no flag {option}") from None


def alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """``old`` as a deprecated spelling of ``parser``'s flag ``new`` (hidden from --help)."""
    target = _action(parser, new)
    old_action = parser._optionals._add_action(
        _Deprecated(
            [old],
            target.dest,
            target=target,
            new=new,
            nargs=target.nargs,
            const=target.const,
            type=target.type,
            choices=target.choices,
            metavar=target.metavar,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    )
    if target.required:
        # argparse would not count the alias as the flag: one of the two is required instead
        # ("one of the arguments --dictionary is required": the alias is hidden there too).
        target.required = False
        target.required_one_of = True
        group = parser.add_mutually_exclusive_group(required=True)
        group._group_actions += [target, old_action]
    parser.deprecated = [*getattr(parser, "deprecated", []), (old, new)]


def rename(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Rename ``parser``'s flag ``old`` (made elsewhere, e.g. from a config field) to ``new``,
    keeping ``old`` as a deprecated alias."""
    action = _action(parser, old)
    del parser._option_string_actions[old]
    action.option_strings = [new if o == old else o for o in action.option_strings]
    parser._option_string_actions[new] = action
    alias(parser, old, new)
