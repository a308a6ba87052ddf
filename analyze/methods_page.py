"""The methods comparison's page: its frontier figures (matplotlib) and its HTML, drawn from
what ``methods.py`` computed (as ``report_page`` draws ``report``'s)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from unsuperpose.analyze.figures import save_figure  # noqa: E402
from unsuperpose.analyze.html import Raw, esc, image, page, table  # noqa: E402


def frontier_figure(
    series: list[tuple[str, list, list, bool]], y: str, path: Path, *, title: str, ylabel: str
) -> Path | None:
    """Every method's points and its Pareto frontier of ``y`` against L0. ``series``: per method
    with a ``y``, (method, its points, its frontier, whether it is a fitted baseline)."""
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    cmap = plt.get_cmap("tab10")
    for i, (arch, mine, front, fitted) in enumerate(series):
        colour = cmap(i % 10)
        style = "--" if fitted else "-"
        ax.scatter(
            [max(p.l0, 0.5) for p in mine],
            [getattr(p, y) for p in mine],
            s=12,
            alpha=0.35,
            color=colour,
        )
        ax.plot(
            [max(p.l0, 0.5) for p in front],
            [getattr(p, y) for p in front],
            style,
            marker="o",
            ms=4,
            color=colour,
            label=arch + (" (baseline)" if fitted else ""),
        )
    ax.set_xscale("log")
    if y == "fvu":
        ax.set_yscale("log")
    elif y == "delta_ce":
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("L0: non-zero codes per token (held-out; log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def difference_text(a, b) -> str:
    """'0.31 ± 0.04 (SE)' for a.mean - b.mean of two ``methods.Concentration``, or '' when
    either is missing."""
    if None in (a.mean, b.mean, a.se, b.se):
        return ""
    return f"{a.mean - b.mean:+.3f} ± {math.hypot(a.se, b.se):.3f}"


def render(report, title: str, matched: dict, verdicts: list[str]) -> str:
    """The page of a ``methods.MethodsReport``; ``matched``: {y: (budgets, rows)} as
    ``methods.matched_rows`` gives them (with standard errors), ``verdicts`` the fidelity
    sentences."""
    pts = report.points
    parts = [
        f"<h1>Methods compared: {esc(title)}</h1>",
        "<p>Every dictionary set of this layer, SAE architectures and fitted baselines, on "
        "the same held-out rows. L0 is the mean number of non-zero codes per token for every "
        f"method. Width d = {report.d}.</p>",
    ]
    for y in ("fvu", "delta_ce"):
        if y in report.figures:
            parts.append(image(report.figures[y], f"methods {y}"))
    rows_of = {p.heldout_rows for p in pts}
    said = {
        "fvu": f"on {', '.join(f'{r:,}' for r in sorted(rows_of))} held-out rows",
        "delta_ce": "± its standard error over the spliced tokens",
    }
    for y, what in (("fvu", "held-out FVU"), ("delta_ce", "ΔCE (nats)")):
        bs, rows = matched[y]
        if bs and any(any(v is not None for v in r[1:]) for r in rows):
            parts.append(f"<h2>Lowest {what} at L0 ≤ budget</h2>")
            parts.append(
                f"<p>Per method, its best dictionary with held-out L0 at most the budget "
                f"({said[y]}); '-': nothing that sparse.</p>"
            )
            parts.append(table(["method", *[f"L0 ≤ {b}" for b in bs]], rows))
    if verdicts:
        parts.append(
            "<h2>SAEs against baselines</h2><ul>"
            + "".join(f"<li>{esc(v)}</li>" for v in verdicts)
            + "</ul>"
        )
    parts.append(
        f"<h2>Interpretability at matched L0 (target {report.target_l0:g})</h2>"
        "<p>Per method, the dictionary whose held-out L0 is nearest the target (log scale; a "
        "tie goes to the larger one), chosen before its units were looked at. Token "
        "concentration: the share of a unit's top activations on its most common token "
        "(analyze/monosemantic.py); mean ± standard error over the units with enough firing "
        "rows. The store's own neurons are the reference.</p>"
    )
    ref = report.concentration.get("store neurons")
    rows = []
    for arch, p in report.picked.items():
        c = report.concentration.get(arch)
        link = report.browser.get(p.sae_dir.name)
        cell = (
            Raw(f'<a href="{esc(Path(link).relative_to(report.out))}">{esc(p.name)}</a>')
            if link
            else p.name
        )
        rows.append(
            [
                arch,
                cell,
                p.l0,
                p.fvu,
                p.delta_ce,
                c.scored if c else None,
                c.mean if c else None,
                c.se if c else None,
                c.median if c else None,
                difference_text(c, ref) if c and ref else "",
            ]
        )
    if ref is not None:
        rows.append(
            [
                "store neurons",
                "the raw MLP neurons",
                None,
                None,
                None,
                ref.scored,
                ref.mean,
                ref.se,
                ref.median,
                "",
            ]
        )
    cols = [
        "method",
        "dictionary",
        "L0",
        "FVU",
        "ΔCE",
        "units scored",
        "token conc. mean",
        "SE",
        "median",
        "minus neurons",
    ]
    parts.append(table(cols, rows, left=2))
    parts.append("<h2>Every dictionary</h2>")
    keys = [
        "arch",
        "set",
        "dict_label",
        "sparsity_name",
        "sparsity",
        "heldout_l0",
        "heldout_fvu",
        "heldout_rows",
        "delta_ce",
        "delta_ce_se",
        "ce_loss_recovered",
    ]
    parts.append(
        table(
            keys,
            [[p.row()[k] for k in keys] for p in sorted(pts, key=lambda p: (p.arch, p.size, p.l0))],
            left=4,
        )
    )
    for n in report.notes:
        parts.append(f'<p class="note">{esc(n)}</p>')
    return page(f"methods compared: {title}", "\n".join(parts))
