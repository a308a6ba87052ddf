"""The command layer: ``cli.py`` (the ``unsuperpose`` command) and one module per subcommand.

This folder installs as ``unsuperpose.commands`` (pyproject's package-dir), above every stage:
it parses flags, calls the stages' library functions and prints; nothing below imports it.
"""
