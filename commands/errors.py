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
from unsuperpose.faults import Fault

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


# What the user does about each kind of fault before running the command again.
_FIXES = {
    "disk-full": "free some space there (or write elsewhere)",
    "permission": "make it writable for this user (or write elsewhere)",
    "read-only": "make that file system writable (or write elsewhere)",
    "io": "check that disk (or write elsewhere)",
    "unreachable": "once the object store answers again",
    "refusing": "once the object store answers again",
    "credentials": "set valid credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "or AWS_PROFILE)",
    "denied": "grant these credentials access to the bucket (or write elsewhere)",
}


def fault_line(fault: Fault, kept: str | None, command: str) -> str:
    """The one line an I/O fault ends in: what happened and where, what was kept, and the
    command to run again (``command``, shell-quoted already)."""
    where = f" at {fault.path}" if fault.path else ""
    detail = f" ({fault.detail})" if fault.kind == "unreachable" else ""
    kept = kept or "nothing written so far is trusted unless it is whole"
    fix = _FIXES[fault.kind]
    then = f"{fix}, run `{command}`" if fault.passing else f"{fix}, then run `{command}`"
    return f"{fault.cause}{where}{detail}; kept: {kept}; {then} again"
