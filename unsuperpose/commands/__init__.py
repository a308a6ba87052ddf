"""Subcommands of the unsuperpose CLI, one module each (see unsuperpose/cli.py)."""
