"""Stage errors -> the CLI's one-line message, in the words of the command line.

A stage library raises ordinary exceptions (ValueError, or a class of its own such as
``harvest.StoreError``) that speak in its own terms: a setting is written as the keyword that
sets it, ``layer='7'`` or ``force=True``. A command runs the stage's calls inside
:func:`stage_errors`, which turns those exceptions into a ``UserError`` (printed without a
traceback, exit 2) and rewrites each keyword it has a flag for: ``layer='7'`` -> ``--layer 7``,
``force=True`` -> ``--force``. Anything else (a bug) still raises with its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
from collections.abc import Iterator, Mapping

from unsuperpose.errors import UserError

# A keyword and its value as messages write them: 'text', "text", or a bare word (a trailing
# full stop ends the sentence, not the value).
_VALUE = r"'[^']*'|\"[^\"]*\"|[^\s,;:()]*[^\s,;:().]"


def flags_of(*configs: type, skip: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """{field: flag} of config dataclasses, as ``config.add_arguments`` names the flags
    (``batch_size`` -> ``--batch-size``), plus ``extra`` keywords a command sets with a flag of
    its own (``allow_incomplete="--allow-incomplete"``); ``extra`` wins."""
    flags = {
        f.name: "--" + f.name.replace("_", "-")
        for cls in configs
        for f in dataclasses.fields(cls)
        if f.name not in skip
    }
    return {**flags, **extra}


def in_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with every ``keyword=value`` of ``flags`` written as the flag that sets it:
    ``--flag value`` (shell-quoted), and ``--flag`` alone for ``=True``."""
    if not flags:
        return message
    names = "|".join(re.escape(n) for n in sorted(flags, key=len, reverse=True))

    def flag(m: re.Match) -> str:
        value = m.group(2)
        if value == "True":
            return flags[m.group(1)]
        if value[:1] in "'\"" and value[-1:] == value[:1] and len(value) > 1:
            value = value[1:-1]
        return f"{flags[m.group(1)]} {shlex.quote(value)}"

    return re.sub(rf"(?<![\w.-])({names})=({_VALUE})", flag, message)


@contextlib.contextmanager
def stage_errors(
    kinds: type[BaseException] | tuple[type[BaseException], ...],
    flags: Mapping[str, str] | None = None,
    hint: str = "",
) -> Iterator[None]:
    """Run the block; an exception of ``kinds`` raised in it becomes a ``UserError`` with its
    keywords written as ``flags`` (see :func:`in_flags`) and ``hint`` appended (e.g. a flag
    the message cannot name itself, " (--out)")."""
    try:
        yield
    except kinds as exc:
        raise UserError(in_flags(str(exc), flags or {}) + hint) from None
