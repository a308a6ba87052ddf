"""The command-line reference (docs/reference/cli.md), generated from the parsers themselves.

    python -m unsuperpose.commands.cli_reference            # rewrite docs/reference/cli.md
    python -m unsuperpose.commands.cli_reference --check    # exit 1 if the page is out of date

Every subcommand gets a table of its flags: the flag as ``--help`` spells it, its default (the
parser's own, or for the flags generated from a config dataclass the value its help states) and
its meaning (the help text). tests/test_cli_reference.py fails when the committed page differs
from what the parsers say, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from unsuperpose.commands.cli import build_parser, parsers

PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "cli.md"
# On every command: said once at the top, not in every table.
EVERYWHERE = {"help", "debug"}
_DEFAULT_TAIL = re.compile(r"\s*\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)\s*$")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def split_default(action: argparse.Action, help_text: str) -> tuple[str, str]:
    """(meaning, default) of one flag. The default is the parser's own, or for a flag made from a
    config field (whose parser default means "not given") the value its help shows; a help that
    says its default in words ("(default: the model's context length)") gives those words."""
    tail = _DEFAULT_TAIL.search(help_text)
    value = None
    if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
        return help_text, "off"  # a switch (--no-progress): not given unless given
    if action.default not in (None, argparse.SUPPRESS):
        value = _shown(action.default)
    elif getattr(action, "shown_default", None) is not None:
        value = _shown(action.shown_default)
    if value is not None:
        said = (value, str(action.default), str(getattr(action, "shown_default", None)))
        if tail and tail.group(1) in said:
            help_text = help_text[: tail.start()].rstrip()
        return help_text, value
    if tail:
        return help_text[: tail.start()].rstrip(), tail.group(1)
    required = action.required or getattr(action, "required_one_of", False)
    return help_text, "required" if required else "—"


def flag_rows(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, str, str]]:
    """(group title, flag as --help spells it, default, meaning) of each of a parser's flags."""
    formatter = parser._get_formatter()
    for group in parser._action_groups:
        for action in group._group_actions:
            if action.dest in EVERYWHERE or isinstance(action, argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            help_text = formatter._expand_help(action) if action.help else ""
            meaning, default = split_default(action, help_text)
            flag = formatter._format_action_invocation(action)
            yield group.title or "", flag, default, meaning


def render() -> str:
    parser = build_parser()
    out = [
        "# Command-line reference",
        "",
        "Generated from the parsers by `python -m unsuperpose.commands.cli_reference`; do not",
        "edit by hand (`tests/test_cli_reference.py` fails when this page and the parsers differ).",
        "Every command also takes `-h/--help` and `--debug` (print the traceback of an I/O fault",
        "too). A flag's default is the value a run without the flag uses.",
        "",
    ]
    for path, sub, help_line in parsers(parser):
        out += [f"## `unsuperpose {' '.join(path)}`", ""]
        description = sub.description or help_line
        if description and issubclass(sub.formatter_class, argparse.RawDescriptionHelpFormatter):
            out += ["```text", description.strip("\n"), "```", ""]  # laid out by hand
        elif description:
            out += [_cell(description), ""]
        children = [p for p, _, _ in parsers(sub)]
        if children:
            names = ", ".join(f"`{' '.join(c)}`" for c in children if len(c) == 1)
            out += [f"Subcommands: {names}.", ""]
        rows = list(flag_rows(sub))
        old = getattr(sub, "deprecated", [])
        if old:
            spelled = ", ".join(f"`{o}` (now `{n}`)" for o, n in old)
            out += [f"Old spellings, kept for one release with a warning: {spelled}.", ""]
        if not rows:
            continue
        out += ["| flag | default | meaning |", "| --- | --- | --- |"]
        for _, flag, default, meaning in rows:
            out.append(f"| `{_cell(flag)}` | {_cell(default)} | {_cell(meaning)} |")
        out.append("")
    out += _index(parser)
    return "\n".join(out).rstrip() + "\n"


def _index(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag once, with the commands that take it: a flag means one thing in all of them."""
    where: dict[str, list[str]] = {}
    for path, sub, _ in parsers(parser):
        for _, flag, _, _ in flag_rows(sub):
            for option in flag.split(", "):
                where.setdefault(option.split(" ")[0], []).append(" ".join(path))
    out = ["## Every flag, and the commands that take it", ""]
    out += ["| flag | commands |", "| --- | --- |"]
    for flag in sorted(where, key=lambda f: f.lstrip("-").lower()):
        out.append(f"| `{flag}` | {', '.join(where[flag])} |")
    return [*out, ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    p.add_argument(
        "--out", type=Path, default=PAGE, help="the page to write (default: %(default)s)"
    )
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m unsuperpose.commands.cli_reference")
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
