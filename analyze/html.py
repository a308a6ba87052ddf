"""Self-contained HTML: figures embedded as base64, no external CSS, fonts or scripts, so a page
reads offline and survives being mailed or copied out of ``runs/``."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from unsuperpose.config import write_text_atomic

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
img { max-width: 100%; margin: 0.4em 0; }
code, pre { background: #f6f6f6; padding: 1px 4px; border-radius: 3px; }
pre { padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
.ok { color: #17702e; font-weight: 600; } .no { color: #a11; font-weight: 600; }
.note { color: #555; font-size: 0.9em; }
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def fmt(v, digits: int = 4) -> str:
    """Numbers for tables: ints as ints, floats to ``digits`` significant figures, NaN as '-'."""
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


def image(path: str | Path, alt: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(columns: list[str], rows: list[list], *, left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned (labels), the rest numbers."""

    def cell(tag: str, i: int, v) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{v if isinstance(v, Raw) else esc(fmt(v))}</{tag}>"

    head = "".join(cell("th", i, c) for i, c in enumerate(columns))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Raw(str):
    """Markup that ``table`` must not escape (e.g. a coloured verdict)."""


def page(title: str, body: str, *, style: str = STYLE, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{style}</style></head>"
        f"<body>{body}{js}</body></html>\n"
    )


def write(path: str | Path, text: str) -> Path:
    """Write a page so that a browser never opens half of it."""
    return write_text_atomic(path, text)
