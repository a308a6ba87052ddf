"""Dataclass configs <-> argparse flags <-> JSON.

Every stage describes its knobs as a dataclass whose fields carry a ``help`` string in their
metadata; this module turns such a class into CLI flags (one per field) and back, and saves it
as JSON beside whatever it produced. Keeping that in one place means a field added to a config
is a flag, a help line and a provenance entry at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Any, TypeVar

from unsuperpose import faults

T = TypeVar("T")


def field(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: typing.Callable[[], list] | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field with its CLI help text; lists/dicts need ``default_factory``.
    ``choices``: a function giving the flag's allowed values when the parser is built (a list
    that grows after import, such as the registered architectures)."""
    metadata = {"help": help, **({"choices": choices} if choices is not None else {})}
    return dataclasses.field(default=default, metadata=metadata, **kw)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-").replace(".", "-")


def _base_type(tp: Any) -> Any:
    """``Optional[X]`` -> X; leaves other types alone."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if (
        typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", ()))
        and len(args) == 1
    ):
        return args[0]
    return tp


def _parse_list(item_type: Any):
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got an empty value")
        try:
            return [item_type(p) for p in parts]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"cannot parse {text!r} as a list of {item_type.__name__}: {exc}"
            ) from exc

    return parse


# A help text that already says its default ("(default: the GPU when ...)", "by default",
# "; default: every set there") gets no second "(default: ...)": --help says each default once.
_STATES_DEFAULT = re.compile(r"([(;,]\s*(the )?default\b)|(\bby default\b)", re.IGNORECASE)


def states_default(help_text: str | None) -> bool:
    """Whether ``help_text`` says its flag's default itself."""
    return bool(help_text) and _STATES_DEFAULT.search(help_text) is not None


def _with_default(help_text: str, shown: Any) -> str:
    """The help, with "(default: ...)" unless it says its default or has none (None: the help
    says what happens without the flag)."""
    if states_default(help_text) or shown is None:
        return help_text
    return f"{help_text} (default: {shown})"


def _is_nested(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    defaults: Any = None,
    prefix: str = "",
    default_text: str | None = None,
) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (bools become --x/--no-x).

    ``defaults``: an instance of ``cls`` holding the command's own defaults (they may differ from
    the dataclass's, e.g. a toy grid's dead window); ``--help`` shows those, the values a run
    without the flag will use. A field that is itself a dataclass (one architecture's options)
    becomes a group of flags named after it: field ``k_aux`` of ``auxk`` is ``--auxk-k-aux``,
    parsed into ``auxk.k_aux`` (see :func:`replace_from_args`).

    ``default_text``: what --help says of every flag's default instead of the field's value, where
    the command takes the unset fields from elsewhere (harvest: the model's recorded corpus). Each
    flag keeps the default it shows as ``action.shown_default`` (the CLI reference reads it).
    """
    hints = typing.get_type_hints(cls)
    title = prefix.rstrip(".") or cls.__name__
    group = parser.add_argument_group(title, (cls.__doc__ or "").strip().split("\n")[0])
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            )
        if _is_nested(tp):
            add_arguments(
                parser, tp, defaults=default, prefix=f"{prefix}{f.name}.", default_text=default_text
            )
            continue
        name = prefix + f.name
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if prefix and tp is not bool:
            kw["metavar"] = f.name.upper()
        if tp is bool:
            shown = default if default_text is None else default_text
            action = group.add_argument(
                _flag(name),
                action=argparse.BooleanOptionalAction,
                help=_with_default(help_text, shown),
                **kw,
            )
            action.shown_default = shown
            continue
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kw["type"] = _parse_list(item)
            shown = ",".join(str(v) for v in default) if default else default
        elif typing.get_origin(tp) is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
            shown = default
        elif "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"]())
            kw["type"] = str
            shown = default
        else:
            kw["type"] = tp if tp in (int, float, str) else str
            shown = default
        shown = shown if default_text is None else default_text
        action = group.add_argument(_flag(name), help=_with_default(help_text, shown), **kw)
        action.shown_default = shown


def from_args(cls: type[T], args: argparse.Namespace, base: T | None = None, **overrides: Any) -> T:
    """Build ``cls`` from parsed flags: fields the user gave override ``base`` (or the defaults)."""
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    given.update(overrides)
    if base is not None:
        return dataclasses.replace(base, **given)
    return cls(**given)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: dict) -> T:
    """Inverse of :func:`to_dict`; unknown keys are an error so stale JSON is noticed. A class
    whose saved form changed gives ``upgrade_saved(data) -> data``, which turns what older
    versions wrote into what it takes now."""
    upgrade = getattr(cls, "upgrade_saved", None)
    if upgrade is not None:
        data = upgrade(dict(data))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)} in saved config")
    hints = typing.get_type_hints(cls)
    fixed = {}
    for k, v in data.items():
        tp = _base_type(hints[k])
        if _is_nested(tp) and isinstance(v, dict):
            v = from_dict(tp, v)
        fixed[k] = tuple(v) if typing.get_origin(tp) is tuple and isinstance(v, list) else v
    return cls(**fixed)


def replace_from_args(
    obj: T, args: argparse.Namespace, *, skip: tuple[str, ...] = (), prefix: str = ""
) -> T:
    """``obj`` with every field the user gave a flag for replaced, nested dataclasses included
    (their flags' dests are ``<field>.<subfield>``, as :func:`add_arguments` names them)."""
    hints = typing.get_type_hints(type(obj))
    given = {}
    for f in dataclasses.fields(obj):
        if f.name in skip or not f.init:
            continue
        if _is_nested(_base_type(hints[f.name])):
            given[f.name] = replace_from_args(
                getattr(obj, f.name), args, prefix=f"{prefix}{f.name}."
            )
        elif hasattr(args, prefix + f.name):
            given[f.name] = getattr(args, prefix + f.name)
    return dataclasses.replace(obj, **given)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` so that a reader never sees half a file (temp file + rename)."""
    # As UTF-8 bytes, as given: a CSV's \r\n rows stay as the csv module made them.
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` so that a reader never sees half a file (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); results are meant to be shared like any other.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        faults.mark(exc, path)  # a failed write() names no file; the one-line error should
        raise
    return path


def json_text(data: Any) -> str:
    """How every JSON file of ours is encoded (numpy and torch scalars, paths, dataclasses)."""
    return json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so that a reader never sees half a file."""
    write_text_atomic(path, json_text(data))


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
