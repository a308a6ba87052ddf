"""The ``unsuperpose`` command: one subcommand per stage.

This is the only layer that wires stages together. Each subcommand lives in
``commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args)``; that keeps
this file a registry and lets a stage's flags live next to the code that wires it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import traceback

from unsuperpose import __version__, distributed, faults, locking, tracking
from unsuperpose.commands.errors import fault_line
from unsuperpose.config import states_default
from unsuperpose.errors import UserError

COMMANDS = ["toy", "lm", "harvest", "train", "analyze", "demo"]
# An I/O fault (a full disk, a denied permission, an object store that is down): nothing kept
# is lost and the same command resumes. sysexits.h's EX_IOERR, so that a script can tell it
# from bad input (2) and from a bug (1).
EXIT_IO = 74
DEBUG_ENV = "UNSUPERPOSE_DEBUG"
DEBUG_HELP = f"print the traceback of an I/O fault too (or set {DEBUG_ENV}=1)"
# The commands that run for minutes and log to W&B (their own trackers, or those of the stages a
# demo runs): each takes --wandb, --wandb-project and --wandb-entity (unsuperpose.tracking).
LONG_RUNNING = [
    ("lm", "train"),
    ("harvest",),
    ("toy",),
    ("train",),
    ("analyze", "report"),
    ("analyze", "methods"),
    ("demo",),
]


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser`` and every subcommand below it, so it may come anywhere."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases name a parser twice
                _add_debug(sub)


class _DefaultOnce(argparse.HelpFormatter):
    """Each flag's default said once: "(default: X)" appended only where the help does not say
    it already, and never for a default of None (the help says what happens then) or a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or states_default(text)
            or action.default in (None, argparse.SUPPRESS)
            or action.nargs == 0  # --x / --no-x and store_true: the flag is the value
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class HelpFormatter(_DefaultOnce, argparse.HelpFormatter):
    pass


class RawDescriptionHelpFormatter(_DefaultOnce, argparse.RawDescriptionHelpFormatter):
    pass


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """(path, parser, its one-line help) of every subcommand below ``parser``, depth first."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                if any(sub is p for _, p, _ in found):  # an alias names a parser twice
                    continue
                found.append(((*path, name), sub, helps.get(name, "")))
                found += parsers(sub, (*path, name))
    return found


def subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    """The parser of the subcommand ``names`` (e.g. "analyze", "report") below ``parser``."""
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unsuperpose",
        description="Take features out of superposition: LM, harvest, SAE grids, analysis.",
    )
    parser.add_argument("--version", action="version", version=f"unsuperpose {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"unsuperpose.commands.{name}").add_parser(sub)
    for names in LONG_RUNNING:
        tracking.add_wandb_arguments(subparser(parser, *names))
    _add_debug(parser)
    for _, sub, _ in [((), parser, ""), *parsers(parser)]:
        raw = issubclass(sub.formatter_class, argparse.RawDescriptionHelpFormatter)
        sub.formatter_class = RawDescriptionHelpFormatter if raw else HelpFormatter
    return parser


def _kept(args: argparse.Namespace) -> str | None:
    """What the command's stage kept across a fault, as its module says (``kept(args)``)."""
    module = importlib.import_module(f"unsuperpose.commands.{args.command}")
    try:
        return module.kept(args) if hasattr(module, "kept") else None
    except Exception:  # noqa: BLE001 (the line is still worth printing without it)
        return None


def _resume_command(argv: list[str]) -> str:
    return shlex.join(["unsuperpose", *(a for a in argv if a != "--debug")])


def _lost_line(args: argparse.Namespace, argv: list[str]) -> str:
    """The one line of a run stopped because its lease on object storage was lost."""
    kept = _kept(args) or "what was written before, each object whole"
    return (
        f"{'; '.join(locking.lost())}; stopped so that no two runs write it; kept: {kept}; "
        f"once the object store answers, run `{_resume_command(argv)}` again"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if distributed.launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        # Under torchrun rank 0 speaks for the job; the others print only their errors.
        sys.stdout = open(os.devnull, "w")
    code = 1  # an exception that escapes below
    locking.forget_lost()
    try:
        with tracking.wandb_env(
            getattr(args, "wandb", None),
            getattr(args, "wandb_project", None),
            getattr(args, "wandb_entity", None),
        ):
            code = int(args.func(args) or 0)
    except (UserError, KeyboardInterrupt) as exc:
        if locking.lost():  # the lease's thread stopped this run: an outage, not Ctrl-C
            print(f"unsuperpose {args.command}: error: {_lost_line(args, argv)}", file=sys.stderr)
            code = EXIT_IO
        elif isinstance(exc, UserError):
            print(f"unsuperpose {args.command}: error: {exc}", file=sys.stderr)
            code = 2
        else:
            print(
                f"\nunsuperpose {args.command}: interrupted; run the same command again to resume.",
                file=sys.stderr,
            )
            code = 130
    except Exception as exc:
        fault = faults.classify(exc)
        # A lost lease is why the run stopped, whatever failed after it.
        if fault is None and not locking.lost():
            raise  # a bug: its traceback is what helps
        if debug:
            traceback.print_exc()
        if locking.lost():
            line = _lost_line(args, argv)
        else:
            line = fault_line(fault, _kept(args), _resume_command(argv))
        print(f"unsuperpose {args.command}: error: {line}", file=sys.stderr)
        code = EXIT_IO
    finally:
        distributed.teardown(ok=code == 0)
    distributed.leave(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
