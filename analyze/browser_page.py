"""The feature browser's pages: one self-contained HTML page per dictionary (and one for the MLP
neurons as the baseline), rows sortable by firing frequency with a few lines of inline script."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from unsuperpose.analyze.browser import Context, UnitStats, bin_edges, firing_summary
from unsuperpose.analyze.html import STYLE, Raw, esc, fmt, page, table, write

STYLE_EXTRA = """
.ctx { font-family: ui-monospace, monospace; font-size: 0.82em; white-space: pre-wrap;
       text-align: left; margin: 1px 0; }
.ctx mark { border-radius: 2px; color: #000; outline: 1px solid #c60; }
.ctxs { max-height: 16em; overflow-y: auto; }
td.ctxcell { text-align: left; min-width: 32em; }
button { margin-right: 0.4em; }
"""

# Sorting moves the <tr> elements; data-* attributes hold the keys (no external library).
SORT_JS = """
function sortUnits(key, desc) {
  const body = document.getElementById('units');
  const rows = Array.from(body.rows);
  rows.sort((a, b) => (parseFloat(a.dataset[key]) - parseFloat(b.dataset[key])) * (desc ? -1 : 1));
  rows.forEach(r => body.appendChild(r));
}
"""


def bars_svg(
    counts: np.ndarray,
    lo_label: str,
    hi_label: str,
    width: int = 170,
    height: int = 42,
    what: str = "histogram",
) -> str:
    """A tiny bar chart of ``counts`` with its two ends labelled."""
    c = np.asarray(counts, dtype=float)
    if not c.any():
        return ""
    bw = width / len(c)
    # Empty bins draw nothing; a non-empty one at least one pixel, so rare values stay visible.
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 12 - h:.1f}" width="{max(bw - 0.5, 0.5):.1f}" '
        f'height="{h:.1f}" fill="#3a6fb0"/>'
        for i, h in enumerate(np.where(c > 0, np.maximum(c / c.max() * (height - 14), 1), 0))
        if h > 0
    )
    label = (
        f'<text x="0" y="{height - 1}" font-size="9">{esc(lo_label)}</text>'
        f'<text x="{width}" y="{height - 1}" font-size="9" text-anchor="end">{esc(hi_label)}</text>'
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="{esc(what)}">'
        f"{bars}{label}</svg>"
    )


def hist_svg(counts: np.ndarray, width: int = 170, height: int = 42) -> str:
    """One unit's positive activations (log2 bins), cropped to its range."""
    nz = np.flatnonzero(counts)
    if not len(nz):
        return ""
    lo, hi = nz[0], nz[-1] + 1
    edges = bin_edges()
    return bars_svg(
        counts[lo:hi], f"{edges[lo]:.2g}", f"{edges[hi]:.2g}", width, height, "activation histogram"
    )


def show_token(text: str) -> str:
    """Token text made visible: newlines and tabs as symbols, so each context stays one line."""
    return text.replace("\n", "\u23ce").replace("\t", "\u21e5")


def context_html(ctx: Context, decode: Callable[[list[int]], str], unit_max: float) -> str:
    """Decoded text around the token, the token itself highlighted by its activation strength.

    Left context, token and right context are decoded as three runs rather than token by token,
    so that characters whose UTF-8 bytes span several byte-level BPE tokens come out whole.
    """
    strength = ctx.act / unit_max if unit_max > 0 else 0.0
    alpha = 0.15 + 0.85 * min(max(strength, 0.0), 1.0)
    left = show_token(decode(ctx.tokens[: ctx.at])) if ctx.at else ""
    right = show_token(decode(ctx.tokens[ctx.at + 1 :])) if ctx.at + 1 < len(ctx.tokens) else ""
    tok = show_token(decode(ctx.tokens[ctx.at : ctx.at + 1])) if ctx.tokens else ""
    return (
        f'<div class="ctx">{esc(left)}<mark style="background: rgba(255,140,0,{alpha:.2f})" '
        f'title="activation {ctx.act:.4g} (row {ctx.row})">{esc(tok)}</mark>{esc(right)} '
        f'<span class="note">{ctx.act:.3g}</span></div>'
    )


def render(
    title: str,
    what: str,
    stats: UnitStats,
    ctxs: list[list[Context]],
    decode: Callable[[list[int]], str],
    meta: dict,
    judged: dict[str, dict] | None = None,
) -> str:
    """One page: headline numbers, provenance, then one sortable row per unit that ever fired.

    ``judged``: unit (as a string) -> its LLM-judged explanation and scores (``autointerp``),
    shown under the unit's index."""
    summary = firing_summary(stats)
    head = (
        f"<h1>{esc(title)}</h1>"
        f"<p>{summary['units']:,} {what}s over {summary['rows']:,} store rows; "
        f"{summary['never_fired']:,} never fired (listed at the end); median firing frequency "
        f"of the others {fmt(summary['median_freq'], 3)}. A {what} <i>fires</i> on a row when "
        "its activation is above 0. Histograms: positive activations on log2-spaced bins "
        "(the labels give the range). Contexts: the highest activations, the token itself "
        "highlighted, darker when closer to this unit's maximum.</p>"
    )
    head += table(["", ""], [[k, v] for k, v in meta.items()], left=2)
    buttons = (
        "<p>sort: <button onclick=\"sortUnits('freq', true)\">frequency &darr;</button>"
        "<button onclick=\"sortUnits('freq', false)\">frequency &uarr;</button>"
        "<button onclick=\"sortUnits('max', true)\">max activation &darr;</button>"
        f"<button onclick=\"sortUnits('i', false)\">{esc(what)} index</button></p>"
    )
    order = np.argsort(-stats.freq, kind="stable")
    rows = []
    for u in order:
        if stats.count[u] == 0:
            continue
        ctx = "".join(context_html(c, decode, float(stats.max[u])) for c in ctxs[u])
        j = (judged or {}).get(str(u))
        note = (
            f'<div class="note">&ldquo;{esc(j["explanation"])}&rdquo; detection '
            f"{j['detection']:.2f}, fuzzing {j['fuzzing']:.2f}</div>"
            if j
            else ""
        )
        rows.append(
            f'<tr data-i="{u}" data-freq="{stats.freq[u]:.6g}" data-max="{stats.max[u]:.6g}">'
            f"<td>{u}{note}</td><td>{fmt(float(stats.freq[u]), 3)}</td>"
            f"<td>{fmt(float(stats.max[u]), 3)}</td><td>{fmt(float(stats.mean_active[u]), 3)}</td>"
            f"<td>{hist_svg(stats.hist[u])}</td>"
            f'<td class="ctxcell"><div class="ctxs">{ctx}</div></td></tr>'
        )
    units = (
        f"<table><thead><tr><th>{esc(what)}</th><th>firing frequency</th><th>max</th>"
        '<th>mean when firing</th><th>activation histogram</th><th class="l">top-activating '
        f'contexts</th></tr></thead><tbody id="units">{"".join(rows)}</tbody></table>'
    )
    dead = np.flatnonzero(stats.count == 0)
    tail = (
        f'<h3>Never fired ({len(dead):,})</h3><p class="note">{esc(", ".join(map(str, dead)))}</p>'
        if len(dead)
        else ""
    )
    return page(title, head + buttons + units + tail, style=STYLE + STYLE_EXTRA, script=SORT_JS)


def _quartiles(m: dict, name: str) -> str:
    if not m.get(f"{name}_scored"):
        return "-"
    return f"{m[f'{name}_median']:.2f} ({m[f'{name}_q25']:.2f}–{m[f'{name}_q75']:.2f})"


def concentration_table(mono: dict[str, dict]) -> str:
    """Token and pair concentration of every page's units: median (quartiles) and a histogram."""
    rows = []
    for name, m in mono.items():
        hist = (
            bars_svg(m["token_hist"], "0", "1", what="token concentration")
            if m.get("token_scored")
            else "-"
        )
        rows.append(
            [
                name,
                m.get("token_scored", 0),
                _quartiles(m, "token"),
                Raw(hist),
                _quartiles(m, "pair"),
            ]
        )
    k = next(iter(mono.values()))["k"] if mono else 0
    note = (
        f"<p>Concentration of the top {k} activations (monosemanticity without an LLM): the "
        f"share of a unit's {k} strongest rows that fall on its most common token (or pair of "
        "previous token and token). 1 = a single token; higher than the neurons' = the "
        "dictionary is more monosemantic than the neuron basis. Units firing on fewer than "
        f"{k} rows are not scored. Histogram: token concentration, 0 to 1 in tenths.</p>"
    )
    return note + table(
        [
            "page",
            "units scored",
            "token concentration, median (quartiles)",
            "distribution",
            "pair concentration",
        ],
        rows,
        left=1,
    )


def autointerp_table(summary: dict) -> str:
    """Every page's LLM-judged detection and fuzzing scores: mean ± SE over its judged units."""

    def cell(m: dict) -> str:
        if m["mean"] is None:
            return "-"
        return f"{m['mean']:.3f}" + (f" ± {m['se']:.3f}" if m["se"] is not None else "")

    rows = [
        [
            Raw(f'<a href="autointerp/{esc(name)}.jsonl">{esc(name)}</a>'),
            f"{d['units_judged']} of {d['units_eligible']:,} eligible ({d['units']:,})",
            cell(d["detection"]),
            cell(d["fuzzing"]),
            d["parse_failures"],
        ]
        for name, d in summary["dictionaries"].items()
    ]
    s = summary["settings"]
    note = (
        f"<p>Judged by <b>{esc(summary['model'])}</b> at {esc(summary['endpoint'])} over "
        f"{summary['rows_scanned']:,} store rows. Each unit is explained from its {s['explain']} "
        f"strongest excerpts; the explanation is then scored on {s['score']} excerpts drawn at "
        "random from the unit's other firing rows and as many on which it is silent (detection: "
        "which are active?) and on the active ones with one token marked, right or wrong "
        "(fuzzing: which marks are right?). Score: the fraction classified right; guessing "
        f"scores {summary['chance']:g}. Mean ± SE over the units judged (chosen at random, seed "
        f"{s['seed']}, among those firing on at least {s['explain'] + s['score']} rows). "
        "Prompts and raw answers: the linked files.</p>"
    )
    columns = ["page", "units judged", "detection", "fuzzing", "unparsed answers"]
    return "<h2>LLM-judged interpretability</h2>" + note + table(columns, rows)


def write_index(
    out: Path,
    pages: dict[str, Path],
    meta: dict,
    mono: dict[str, dict] | None = None,
    autointerp: dict | None = None,
) -> Path:
    links = "".join(
        f'<li><a href="{esc(p.name)}">{esc(name)}</a></li>' for name, p in pages.items()
    )
    body = (
        f"<h1>Feature browser</h1>{table(['', ''], [[k, v] for k, v in meta.items()], left=2)}"
        f"<ul>{links}</ul>"
        + (concentration_table(mono) if mono else "")
        + (autointerp_table(autointerp) if autointerp else "")
    )
    return write(out / "index.html", page("Feature browser", body))
