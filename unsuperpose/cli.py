"""The ``unsuperpose`` command's entry point (``[project.scripts]``): the command layer itself
lives in the top-level ``commands/`` folder (installed as ``unsuperpose.commands``); this file
and ``__main__.py`` are the core's only doors to it."""

from unsuperpose.commands.cli import EXIT_IO, build_parser, main

__all__ = ["EXIT_IO", "build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
