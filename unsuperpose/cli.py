"""The ``unsuperpose`` command: one subcommand per stage.

This is the only layer that wires stages together. Each subcommand lives in
``unsuperpose/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args)``; that keeps
this file a registry and lets a stage's flags live next to the code that wires it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from unsuperpose import __version__, distributed
from unsuperpose.errors import UserError

COMMANDS = ["toy", "lm", "harvest", "train", "analyze", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unsuperpose",
        description="Take features out of superposition: LM, harvest, SAE grids, analysis.",
    )
    parser.add_argument("--version", action="version", version=f"unsuperpose {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"unsuperpose.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if distributed.launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        # Under torchrun rank 0 speaks for the job; the others print only their errors.
        sys.stdout = open(os.devnull, "w")
    code = 1  # an exception that escapes below
    try:
        code = int(args.func(args) or 0)
    except UserError as exc:
        print(f"unsuperpose {args.command}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(
            f"\nunsuperpose {args.command}: interrupted; run the same command again to resume.",
            file=sys.stderr,
        )
        code = 130
    finally:
        distributed.teardown(ok=code == 0)
    distributed.leave(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
