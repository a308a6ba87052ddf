"""Dictionary methods compared on one LM layer: Cunningham et al.'s (2023) question, whether SAE
directions beat the neuron basis, PCA and ICA, asked with this project's measures.

Every dictionary set under ``runs/sae/<lm>/layer<L>/`` is read, whatever its method (the SAE
architectures and the fitted baselines of ``train/families``), from its ``summary.csv``. What
is compared, and how it is read:

- Fidelity against sparsity: held-out FVU and spliced-in ΔCE against held-out L0 (the mean
  count of non-zero codes per token, the one definition every method shares). A method's
  frontier is its Pareto set over all its sizes and knob values.
- At matched sparsity: for each L0 budget B (powers of two), the lowest FVU (and ΔCE) among a
  method's dictionaries with L0 <= B. A method with nothing that sparse has no entry: a budget is
  compared only where both methods have a point, never extrapolated.
- Interpretability without an LLM (``analyze/monosemantic.py``): the token concentration of the
  top activations of every unit, for ONE dictionary per method chosen by a rule fixed before
  looking: the one whose held-out L0 is nearest (in log) to the target L0 (default d / 8), the
  larger dictionary on a tie. Reported as the mean over scored units with its standard error,
  beside the raw neuron basis of the same store.

ΔCE carries the standard error the splice computed over tokens; FVU is a held-out figure whose
row count is printed with it. This module collects and compares; ``methods_page.py`` draws the
figures and writes the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from unsuperpose import storage
from unsuperpose.analyze.collect import GridError, is_set, lm_sets_dir
from unsuperpose.analyze.html import write
from unsuperpose.analyze.methods_page import (  # the page's; importable from here as before
    difference_text,  # noqa: F401
    frontier_figure,
    render,
)
from unsuperpose.analyze.remote import Names, copies
from unsuperpose.config import write_json_atomic
from unsuperpose.tracking import Tracker
from unsuperpose.train.dictionary import read_config
from unsuperpose.train.io import read_summary, sparsity_of, write_summary
from unsuperpose.train.layout import (
    SUMMARY_FILE,
    dict_dirname,
    dictionary_dirs,
    knob_value_text,
)
from unsuperpose.train.registry import DEFAULT_ARCH, FAMILIES, get_family

NEURONS_PAGE = "neurons"  # the browser's page of the store's raw neurons


@dataclass
class Point:
    """One dictionary of one set, as the comparison reads it."""

    arch: str
    set_name: str
    sae_dir: Path
    size: int
    size_label: str
    knob: str
    value: float
    l0: float
    fvu: float
    heldout_rows: int
    delta_ce: float | None = None
    delta_ce_se: float | None = None
    ce_recovered: float | None = None

    @property
    def name(self) -> str:
        return (
            f"{self.arch} {self.knob} {knob_value_text(self.knob, self.value)}, {self.size_label}"
        )

    @property
    def fitted(self) -> bool:
        return get_family(self.arch).fitted

    def row(self) -> dict:
        return {
            "arch": self.arch,
            "kind": "baseline" if self.fitted else "SAE",
            "set": self.set_name,
            "dict_size": self.size,
            "dict_label": self.size_label,
            "sparsity_name": self.knob,
            "sparsity": self.value,
            "heldout_l0": self.l0,
            "heldout_fvu": self.fvu,
            "heldout_rows": self.heldout_rows,
            "delta_ce": self.delta_ce,
            "delta_ce_se": self.delta_ce_se,
            "ce_loss_recovered": self.ce_recovered,
        }


def _number(row: dict, col: str) -> float | None:
    v = row.get(col)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def collect_points(runs: str | Path, lm: str, layer: int | str) -> list[Point]:
    """Every dictionary of every finished set under the layer's folder, any method."""
    base = lm_sets_dir(runs, lm, layer)
    sets = [p for p in sorted(base.iterdir()) if p.is_dir() and is_set(p)] if base.is_dir() else []
    points = []
    for s in sets:
        if not (s / SUMMARY_FILE).exists():
            continue  # still training: its summary is written at the end
        folders = {}  # (value, n) -> folder; older runs named them without the architecture
        for d in dictionary_dirs(s):
            cfg = read_config(d)
            folders[(sparsity_of(cfg), int(cfg.get("d_sae", 0)))] = d
        for r in read_summary(s / SUMMARY_FILE):
            arch = r.get("arch", DEFAULT_ARCH)
            if arch not in FAMILIES:
                continue
            knob = r.get("sparsity_name", "l1")
            value = r.get("sparsity", r.get("l1"))
            n = int(r["dict_size"])
            points.append(
                Point(
                    arch=arch,
                    set_name=s.name,
                    sae_dir=folders.get(
                        (value, n), s / "saes" / dict_dirname(arch, knob, value, n)
                    ),
                    size=n,
                    size_label=str(r.get("dict_label", n)),
                    knob=knob,
                    value=value,
                    l0=float(r["heldout_l0"]),
                    fvu=float(r["heldout_fvu"]),
                    heldout_rows=int(r["heldout_rows"]),
                    delta_ce=_number(r, "delta_ce"),
                    delta_ce_se=_number(r, "delta_ce_se"),
                    ce_recovered=_number(r, "ce_loss_recovered"),
                )
            )
    if not points:
        raise GridError(
            f"no finished dictionary set under {base}: train some first, e.g. `unsuperpose "
            f"train --store ... --out {base}` (any --arch)"
        )
    return points


def methods_of(points: list[Point]) -> list[str]:
    """The methods present, SAE architectures first, in the registry's order."""
    present = {p.arch for p in points}
    order = [a for a in FAMILIES if not FAMILIES[a].fitted] + [
        a for a in FAMILIES if FAMILIES[a].fitted
    ]
    return [a for a in order if a in present]


def pareto(points: list[Point], y: str) -> list[Point]:
    """The points no other point beats on both L0 (fewer) and ``y`` (lower), by L0."""
    have = sorted(
        (p for p in points if getattr(p, y) is not None), key=lambda p: (p.l0, getattr(p, y))
    )
    out: list[Point] = []
    for p in have:
        if not out or getattr(p, y) < getattr(out[-1], y):
            out.append(p)
    return out


def at_budget(points: list[Point], budget: float, y: str) -> Point | None:
    """The lowest ``y`` among ``points`` with L0 <= ``budget`` (None: nothing that sparse)."""
    ok = [p for p in points if p.l0 <= budget * (1 + 1e-9) and getattr(p, y) is not None]
    return min(ok, key=lambda p: getattr(p, y)) if ok else None


def budgets(points: list[Point], d: int) -> list[int]:
    """Powers of two from 1 to d at which at least two methods have a dictionary, up to the
    first that every dictionary fits under (a larger budget only repeats its row)."""
    out = []
    b = 1
    densest = max((p.l0 for p in points), default=0.0)
    while b <= max(d, 1):
        if len({p.arch for p in points if p.l0 <= b * (1 + 1e-9)}) >= 2:
            out.append(b)
        if b >= densest * (1 - 1e-9):
            break
        b *= 2
    return out


def matched_rows(
    points: list[Point], d: int, y: str, *, with_se: bool = False
) -> tuple[list[int], list[list]]:
    """(budgets, [[method, best y at each budget (None where it has nothing that sparse)]]);
    ``with_se``: ΔCE cells as 'value ± standard error' text, the splice's SE over tokens."""
    bs = budgets(points, d)
    rows = []
    for arch in methods_of(points):
        mine = [p for p in points if p.arch == arch]
        best = [at_budget(mine, b, y) for b in bs]
        rows.append([arch, *[_cell(q, y, with_se) for q in best]])
    return bs, rows


def _cell(p: Point | None, y: str, with_se: bool):
    if p is None:
        return None
    v = getattr(p, y)
    if with_se and y == "delta_ce" and p.delta_ce_se is not None:
        return f"{v:.4g} ± {p.delta_ce_se:.2g}"
    return v


def pick_matched(points: list[Point], target_l0: float) -> dict[str, Point]:
    """Per method, the dictionary whose L0 is nearest ``target_l0`` in log (a tie: the larger
    dictionary), the rule the interpretability comparison uses."""
    out = {}
    for arch in methods_of(points):
        mine = [p for p in points if p.arch == arch and p.l0 > 0]
        if mine:
            out[arch] = min(mine, key=lambda p: (abs(math.log(p.l0 / target_l0)), -p.size))
    return out


def width(points: list[Point]) -> int:
    """d, the activation width, from the neuron basis or the sizes' labels (1x = d)."""
    for p in points:
        if p.size_label == "1x":
            return p.size
    return int(read_config(points[0].sae_dir)["d_in"])


@dataclass
class Concentration:
    """Token concentration of one page's units: mean with its standard error, and the median."""

    page: str
    scored: int
    mean: float | None
    se: float | None
    median: float | None

    @classmethod
    def of(cls, name: str, mono: dict) -> Concentration:
        return cls(
            name,
            mono.get("token_scored", 0),
            mono.get("token_mean"),
            mono.get("token_se"),
            mono.get("token_median"),
        )


@dataclass
class MethodsReport:
    out: Path
    points: list[Point]
    d: int
    target_l0: float
    picked: dict[str, Point]
    figures: dict[str, Path]
    concentration: dict[str, Concentration] = field(default_factory=dict)
    browser: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.out / "index.html"


def fidelity_verdicts(points: list[Point], d: int) -> list[str]:
    """For each budget: the best SAE against the best baseline, FVU and ΔCE, as sentences."""
    out = []
    for b in budgets(points, d):
        saes = [p for p in points if not p.fitted]
        bases = [p for p in points if p.fitted]
        s, t = at_budget(saes, b, "fvu"), at_budget(bases, b, "fvu")
        if s is None or t is None:
            continue
        winner = "the SAE" if s.fvu < t.fvu else ("a tie" if s.fvu == t.fvu else "the baseline")
        ratio = f"{t.fvu / s.fvu:.3g}x" if s.fvu > 0 else "inf"
        line = (
            f"L0 ≤ {b}: lower held-out FVU: {winner} (best SAE {s.name}: {s.fvu:.4g}; best "
            f"baseline {t.name}: {t.fvu:.4g}; baseline/SAE {ratio})"
        )
        sc, tc = at_budget(saes, b, "delta_ce"), at_budget(bases, b, "delta_ce")
        if sc is not None and tc is not None:
            se = math.hypot(sc.delta_ce_se or 0.0, tc.delta_ce_se or 0.0)
            line += (
                f"; ΔCE: SAE {sc.delta_ce:.3g} ± {sc.delta_ce_se or 0:.2g} ({sc.name}) vs baseline "
                f"{tc.delta_ce:.3g} ± {tc.delta_ce_se or 0:.2g} ({tc.name}), baseline - SAE "
                f"{tc.delta_ce - sc.delta_ce:+.3g} ± {se:.2g} nats (SE)"
            )
        out.append(line)
    return out


def build_methods(
    runs: str | Path,
    lm: str,
    layer: int | str,
    out: str | Path,
    *,
    target_l0: float | None = None,
    browse=None,
) -> MethodsReport:
    """Collect every method's sets of the layer, draw and write the comparison to ``out``.

    ``browse(sae_dirs, out_dir)`` (optional) builds the feature browser of the picked
    dictionaries and the store's neurons in one pass and returns its pages; the page then shows
    their token concentration. A ``BrowserError`` it raises is noted and the page goes on.
    """
    from unsuperpose.analyze.browser import BrowserError

    out = Path(out)
    points = collect_points(runs, lm, layer)
    d = width(points)
    target = float(target_l0) if target_l0 else max(1.0, d / 8)
    picked = pick_matched(points, target)
    figdir = out / "figures"
    figures = {}
    for y, label in (("fvu", "held-out FVU (log)"), ("delta_ce", "ΔCE spliced in (nats)")):
        have = [p for p in points if getattr(p, y) is not None]
        series = [
            (arch, mine, pareto(mine, y), get_family(arch).fitted)
            for arch in methods_of(have)
            for mine in [[p for p in have if p.arch == arch]]
        ]
        f = frontier_figure(
            series,
            y,
            figdir / f"methods_{y}.png",
            title=f"{lm} layer {layer}: {label} against L0",
            ylabel=label,
        )
        if f is not None:
            figures[y] = f
    report = MethodsReport(
        out=out, points=points, d=d, target_l0=target, picked=picked, figures=figures
    )
    if browse is not None:
        dirs = [p.sae_dir for p in picked.values()]
        try:
            report.browser = browse(dirs, out / "features")
        except BrowserError as exc:
            report.notes.append(f"no feature browser: {exc}")
        else:
            import json

            mono = json.loads((out / "features" / "monosemanticity.json").read_text())
            names = {p.sae_dir.name: arch for arch, p in picked.items()}
            for page_name, m in mono.items():
                key = names.get(page_name, page_name)
                report.concentration[key if page_name != NEURONS_PAGE else "store neurons"] = (
                    Concentration.of(page_name, m)
                )
    write_summary([p.row() for p in points], out / "methods.csv")
    write_json_atomic(
        out / "methods.json",
        {
            "d": d,
            "target_l0": target,
            "picked": {a: p.row() for a, p in picked.items()},
            "fidelity": fidelity_verdicts(points, d),
            "concentration": {k: vars(c) for k, c in report.concentration.items()},
            "notes": report.notes,
        },
    )
    matched = {y: matched_rows(points, d, y, with_se=True) for y in ("fvu", "delta_ce")}
    verdicts = fidelity_verdicts(points, d)
    write(report.index, render(report, f"{lm} layer {layer}", matched, verdicts))
    _track(report, lm, layer)
    return report


def write_methods(
    runs: storage.Location,
    lm: str,
    layer: int | str,
    out: storage.Location | None = None,
    *,
    target_l0: float | None = None,
    browse=None,
) -> tuple[MethodsReport, Names]:
    """``build_methods`` where ``runs`` and ``out`` (default RUNS/report/LM-layerL-methods) may
    be on object storage: the page's folder is locked as its writer's, runs on S3 read from a
    local copy and a page for S3 written in one, then copied up. Returns the page's report and
    the ``Names`` that show its local paths as their URLs."""
    out = out or runs / "report" / f"{lm}-layer{layer}-methods"
    with copies() as names, names.writing(out, f"the methods page {out}") as local:
        if storage.is_remote(runs):
            runs = names.read_copy(runs, (f"sae/{lm}/layer{layer}",))
        report = build_methods(runs, lm, layer, local, target_l0=target_l0, browse=browse)
    return report, names


def _track(report: MethodsReport, lm: str, layer: int | str) -> None:
    """The page's table, picks and figures to W&B (mode, project and entity from the command's
    --wandb flags or W&B's variables) and to ``out/log.jsonl``."""
    config = {"lm": lm, "layer": layer, "d": report.d, "target_l0": report.target_l0}
    with Tracker(report.out, name=f"methods-{report.out.name}", config=config) as tracker:
        rows = [p.row() for p in report.points]
        cols = [c for c in rows[0] if all(c in r for r in rows)] if rows else []
        tracker.log_table("methods", cols, [[r[c] for c in cols] for r in rows])
        tracker.log_images({f"methods_{y}": path for y, path in report.figures.items()})
        tracker.summary({"picked": {arch: p.name for arch, p in report.picked.items()}})
