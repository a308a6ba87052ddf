"""The analysis report for one LM store: every dictionary set trained on it, beside the toy run.

``build_report`` writes ``<out>/``:
  index.html            one self-contained page: figures, tables, provenance, commands
  figures/lm_heatmap_<metric>.png   the LM grid: dead (capped at 100), SSLL, MSE, L1 loss, L0,
                                    FVU, MMCS with larger dictionaries
  figures/compare_<diagnostic>.png  toy | LM side by side for the three diagnostics
  figures/toy_heatmap_mmcs.png      the toy ground truth's view, for reference
  lm_grid.csv, diagnosis.json       the merged LM grid and where each diagnostic points
and logs the same to one W&B run (offline unless asked otherwise) through ``Tracker``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from unsuperpose import storage
from unsuperpose.analyze.browser import BrowserError
from unsuperpose.analyze.collect import Grid, GridError, collect_lm, collect_toy
from unsuperpose.analyze.compare import COMPARISONS, ratio_label, side_by_side, size_labels
from unsuperpose.analyze.diagnostics import (
    DEAD,
    DEFAULT_TOLERANCE,
    LARGER,
    SSLL,
    Diagnosis,
    diagnose,
    diagnosis_record,
)
from unsuperpose.analyze.evidence import (
    MIN_FIRES,
    WindowRule,
    dead_counts,
    live_masks,
    window_rule,
)
from unsuperpose.analyze.figures import frontier, heatmap
from unsuperpose.analyze.grid import GRID_FIGURES
from unsuperpose.analyze.metrics import mmcs_with_larger, ssll
from unsuperpose.analyze.remote import Names, copies
from unsuperpose.analyze.report_page import render_index
from unsuperpose.analyze.signals import novel_counts
from unsuperpose.config import write_json_atomic
from unsuperpose.tracking import Tracker
from unsuperpose.train.io import read_history, sparsity_of, write_summary
from unsuperpose.train.layout import HISTORY_FILE, report_dirname
from unsuperpose.train.registry import DEFAULT_ARCH, get_family

# The LM heatmaps: every grid figure except those needing ground truth.
LM_FIGURES = [f for f in GRID_FIGURES if f[0] not in ("mmcs", "mcc")]


@dataclass
class Side:
    """One side of the comparison: its merged grid, what the diagnostics say, its size base."""

    name: str
    grid: Grid
    diagnosis: Diagnosis
    base: int  # G for toy data, d for the LM
    base_name: str


@dataclass
class Report:
    out: Path
    lm: Side
    toy: Side | None
    figures: dict[str, Path]
    notes: list[str] = field(default_factory=list)
    features: dict[str, Path] = field(default_factory=dict)
    feature_dict: Path | None = None

    @property
    def index(self) -> Path:
        return self.out / "index.html"


def rescore(grid: Grid) -> None:
    """Recompute the grid-wide measures over the merged grid.

    SSLL standardises over the whole grid and MMCS with larger dictionaries compares across
    sizes, so values saved by separate runs are not comparable once their sets are merged.
    """
    larger = mmcs_with_larger(grid.dictionaries())
    stick = ssll(grid.values("heldout_mse"), grid.values("heldout_l1_loss"))
    for key, cell in grid.cells.items():
        cell.metrics["mmcs_larger"] = larger.get(key, math.nan)
        cell.metrics["ssll"] = stick.get(key, math.nan)


DIAGNOSIS_COLUMNS = ("dead", "heldout_mse", "heldout_l1_loss", "heldout_l0", "mmcs_larger", "ssll")


def grid_latents(grid: Grid) -> dict:
    """Each dictionary's per-latent statistics, read once: all of them, or none ({}) when some
    dictionary was saved before they existed."""
    latents = {key: cell.latent_stats() for key, cell in grid.cells.items()}
    return {} if any(v is None for v in latents.values()) else latents


def grid_rule(
    grid: Grid, *, truth_size: int | None = None, latents: dict | None = None
) -> WindowRule:
    """The window rule (``analyze.evidence``) from what the grid's run saved: its batch, steps,
    held-out rows and each dictionary's per-latent statistics (``grid_latents``, read here
    unless given)."""
    latents = grid_latents(grid) if latents is None else latents
    rows = {
        key: int(c.metrics["heldout_rows"])
        for key, c in grid.cells.items()
        if isinstance(c.metrics.get("heldout_rows"), (int, float))
    }
    cells = list(grid.cells.values())
    curves: dict = {}
    for set_dir in {c.set_dir for c in cells}:
        path = set_dir / HISTORY_FILE
        for rec in read_history(path) if path.exists() else []:
            key = (rec.get("sparsity", rec.get("l1")), rec.get("dict_size"))
            if "train_mse" in rec and key in grid.cells and grid.cells[key].set_dir == set_dir:
                curves.setdefault(key, []).append((int(rec["step"]), float(rec["train_mse"])))
    if set(curves) != set(grid.cells):
        curves = {}
    # the data's variance per coordinate, as each cell's held-out MSE over its FVU has it
    ratios = [
        c.metrics["heldout_mse"] / c.metrics["heldout_fvu"]
        for c in cells
        if isinstance(c.metrics.get("heldout_fvu"), (int, float))
        and math.isfinite(c.metrics["heldout_fvu"])
        and c.metrics["heldout_fvu"] > 0
        and c.metrics.get("heldout_mse") is not None
    ]
    return window_rule(
        latents,
        batch_size=cells[0].identity.get("batch_size") if cells else None,
        heldout_rows=rows if len(rows) == len(grid.cells) else None,
        steps=min(c.steps for c in cells) if cells else None,
        curves=curves,
        variance=statistics.median(ratios) if ratios else None,
        # toy runs are trained at the window the truth derives (``unsuperpose toy``); shown beside
        truth_window=grid.dead_window if truth_size else None,
    )


def diagnose_grid(grid: Grid, *, truth_size: int | None, tolerance: float) -> Diagnosis:
    """``truth_size``: the number of true features (toy data), else None (an LM).

    Dead latents are read at the window the run's own observables call for (``grid_rule``);
    the count at the window the run was trained with stays in the sensitivity table."""
    names = {
        *DIAGNOSIS_COLUMNS,
        *(c for row in grid.rows() for c in row if c.startswith(("dead_w", "heldout_fvu"))),
    }
    if truth_size:
        names.add("mmcs")
    columns = {c: grid.values(c) for c in names}
    latents = grid_latents(grid)
    rule = grid_rule(grid, truth_size=truth_size, latents=latents)
    window = grid.dead_window
    if latents:
        columns["measured"] = {
            k: float((s["heldout_fires"] >= MIN_FIRES).sum()) for k, s in latents.items()
        }
    if rule.readable:
        if window is not None and columns.get("dead"):
            columns.setdefault(f"dead_w{window}", columns["dead"])
        window = rule.window
        columns["dead"] = {k: float(v) for k, v in dead_counts(latents, window).items()}
        # the figures, the tables and lm_grid.csv show the counts the reading used; the count
        # at the training window stays beside them as dead_w<its window>
        for key, cell in grid.cells.items():
            if grid.dead_window is not None and "dead" in cell.metrics:
                cell.metrics.setdefault(f"dead_w{grid.dead_window}", cell.metrics["dead"])
            cell.metrics["dead"] = int(columns["dead"][key])
        columns["novel_next"] = {
            k: float(v)
            for k, v in novel_counts(grid.dictionaries(), live_masks(latents, window)).items()
        }
    return diagnose(
        columns,
        truth_size=truth_size,
        tolerance=tolerance,
        window=window,
        rule=rule,
        arch=grid.arch,
    )


def toy_record(path: str | Path, G: int, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """What every count signal says of one toy run folder, against its truth (G features): the
    record ``unsuperpose toy`` writes as diagnosis.json and the LM report writes under "toy"."""
    grid = collect_toy(path)
    rescore(grid)
    return diagnosis_record(
        diagnose_grid(grid, truth_size=G, tolerance=tolerance), G, "G (ground-truth features)"
    )


def rows_diagnosis(
    rows: list[dict], G: int, window: int | None, tolerance: float = DEFAULT_TOLERANCE
) -> dict:
    """The diagnosis of summary rows alone, dead latents read at the ``window`` the rows were
    counted at and no minimum evidence checked (rows carry no per-latent statistics): for
    studies that re-read one grid at several steps or with cells added (bench_diagnostics).
    A run folder is read with ``toy_record``, which applies the window rule."""
    names = {c for r in rows for c in r}
    columns = {c: {(sparsity_of(r), r["dict_size"]): r[c] for r in rows if c in r} for c in names}
    arch = rows[0].get("arch", DEFAULT_ARCH) if rows else DEFAULT_ARCH
    diag = diagnose(columns, truth_size=G, tolerance=tolerance, window=window, arch=arch)
    return diagnosis_record(diag, G, "G (ground-truth features)")


def full(grid: Grid, column: str) -> dict:
    """A column over every cell of the grid, NaN where undefined (e.g. MMCS with larger
    dictionaries for the largest size), so every figure of a grid has the same rows and columns."""
    values = grid.values(column)
    return {k: values.get(k, math.nan) for k in grid.cells} if values else {}


def lm_figures(side: Side, out: Path) -> dict[str, Path]:
    labels = size_labels({c.n for c in side.grid.cells.values()}, side.base)
    paths = {}
    for col, title, opts in LM_FIGURES:
        values = full(side.grid, col)
        if values:
            paths[f"lm_heatmap_{col}"] = heatmap(
                values,
                out / f"lm_heatmap_{col}.png",
                title=f"{side.name}: {title}",
                size_labels=labels,
                size_axis=f"dictionary size (ratio to d = {side.base}, the activation width)",
                **opts,
            )
    paths.update(frontier_figures(side, out, labels))
    return paths


def frontier_figures(side: Side, out: Path, labels: dict[int, str]) -> dict[str, Path]:
    """L0 against delta CE and against FVU, one line per size, with reference points: the neuron
    basis (every one of the d neurons active, nothing lost) and the ablations (no latent active)."""
    rows = side.grid.rows()
    paths = {}
    spliced = [r for r in rows if isinstance(r.get("delta_ce"), (int, float))]
    ref_ce = {}
    if spliced:
        r0 = spliced[0]
        ref_ce = {
            "neurons (d active)": (side.base, 0.0),
            "zero ablation": (0.0, r0["ce_zero"] - r0["ce_clean"]),
            "mean ablation": (0.0, r0["ce_mean"] - r0["ce_clean"]),
        }
    p = frontier(
        rows,
        "delta_ce",
        out / "lm_frontier_delta_ce.png",
        references=ref_ce,
        size_labels=labels,
        title=f"{side.name}: sparsity vs the LM's loss (validation documents)",
        ylabel="delta CE, nats (SAE spliced in - clean)",
        log_y=True,
    )
    if p:
        paths["lm_frontier_delta_ce"] = p
    p = frontier(
        rows,
        "heldout_fvu",
        out / "lm_frontier_fvu.png",
        size_labels=labels,
        references={"neurons (d active)": (side.base, 0.0), "mean ablation": (0.0, 1.0)},
        title=f"{side.name}: sparsity vs reconstruction (held-out rows)",
        ylabel="fraction of variance unexplained",
        log_y=True,
    )
    if p:
        paths["lm_frontier_fvu"] = p
    return paths


def comparison_figures(lm: Side, toy: Side | None, out: Path) -> dict[str, Path]:
    paths = {}
    for diag, col, title, opts in COMPARISONS:
        paths[f"compare_{diag}"] = side_by_side(
            full(toy.grid, col) if toy else {},
            full(lm.grid, col),
            out / f"compare_{diag}.png",
            diagnostic=diag,
            title=title,
            toy_base=toy.base if toy else 1,
            lm_base=lm.base,
            toy_diag=toy.diagnosis if toy else None,
            lm_diag=lm.diagnosis,
            opts=opts,
            lm_name=lm.name,
        )
    if toy is not None and toy.grid.values("mmcs"):
        col, title, opts = next(f for f in GRID_FIGURES if f[0] == "mmcs")
        paths["toy_heatmap_mmcs"] = heatmap(
            toy.grid.values("mmcs"),
            out / "toy_heatmap_mmcs.png",
            title=f"toy data: {title}",
            size_labels=size_labels({c.n for c in toy.grid.cells.values()}, toy.base),
            size_axis=f"dictionary size (ratio to G = {toy.base} ground-truth features)",
            **opts,
        )
    return paths


def side_record(side: Side) -> dict:
    return diagnosis_record(side.diagnosis, side.base, side.base_name)


def build_report(
    runs: str | Path,
    lm: str,
    layer: int | str,
    *,
    out: str | Path | None = None,
    toy: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    sets: list[str] | None = None,
    arch: str = DEFAULT_ARCH,
    wandb_mode: str | None = None,
    browse: Callable[[Path, Path], dict[str, Path]] | None = None,
    command: str | None = None,
) -> Report:
    """Collect, score, draw and write the report; ``browse(sae_dir, out_dir)`` (optional) builds
    the feature browser for the dictionary the diagnostics point to, linked from the page (when
    it raises ``BrowserError``, the report notes why and goes on without one). A toy run that
    cannot be read is noted too; the LM's grid must be readable (else ``GridError``)."""
    runs = Path(runs)
    out = Path(out) if out else runs / "report" / report_dirname(lm, layer, arch)
    toy_path = Path(toy) if toy else runs / "toy"
    lm_grid = collect_lm(runs, lm, layer, sets=sets, arch=arch)
    rescore(lm_grid)
    notes = list(lm_grid.notes)
    lm_side = Side(
        f"{lm} layer {layer}",
        lm_grid,
        diagnose_grid(lm_grid, truth_size=None, tolerance=tolerance),
        base=lm_grid.d,
        base_name="d (activation width)",
    )
    try:
        toy_grid = collect_toy(toy_path)
    except GridError as exc:
        toy_side = None
        notes.append(f"no toy comparison: {exc}")
    else:
        g = int(toy_grid.source.get("G") or 0)
        if g < 1:
            raise GridError(
                f"{toy_path} does not record its number of ground-truth features G "
                "(source.G in each SAE's config.json); rerun `unsuperpose toy`"
            )
        toy_side = Side(
            "toy data",
            toy_grid,
            diagnose_grid(toy_grid, truth_size=g, tolerance=tolerance),
            base=g,
            base_name="G (ground-truth features)",
        )
    figdir = out / "figures"
    figures = {**lm_figures(lm_side, figdir), **comparison_figures(lm_side, toy_side, figdir)}
    report = Report(out=out, lm=lm_side, toy=toy_side, figures=figures, notes=notes)

    if browse is not None:
        pick = pick_dictionary(lm_side)
        if pick is not None:
            report.feature_dict = lm_grid.cells[pick].sae_dir
            try:
                report.features = browse(report.feature_dict, out / "features")
            except BrowserError as exc:
                notes.append(f"no feature browser: {exc}")

    write_summary(lm_grid.rows(), out / "lm_grid.csv")
    record = {
        "lm": side_record(lm_side),
        "toy": side_record(toy_side) if toy_side else None,
        "notes": notes,
        "sets": [str(p) for p in lm_grid.sets],
    }
    write_json_atomic(out / "diagnosis.json", record)
    render_index(report, command=command)
    _track(report, record, wandb_mode)
    return report


def write_report(
    runs: storage.Location,
    lm: str,
    layer: int | str,
    *,
    out: storage.Location | None = None,
    toy: storage.Location | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    sets: list[str] | None = None,
    arch: str = DEFAULT_ARCH,
    wandb_mode: str | None = None,
    browse: Callable[[Path, Path], dict[str, Path]] | None = None,
    command: str | None = None,
) -> tuple[Report, Names]:
    """``build_report`` where ``runs``, ``toy`` and ``out`` may be on object storage: the report
    folder is locked as its writer's (the runs read are not), runs on S3 are read from a local
    copy and a report for S3 written in one, then copied up. Returns the report and the
    ``Names`` that show its local paths as their URLs. A fitted baseline's ``arch`` is no grid:
    ``GridError``."""
    if get_family(arch).fitted:
        raise GridError(
            f"{arch} is a fitted baseline, not an SAE grid: the report's diagnostics do not "
            f"read it; compare it with `unsuperpose analyze methods --lm {lm} "
            f"--layer {layer}`"
        )
    out = out or runs / "report" / report_dirname(lm, layer, arch)
    with copies() as names, names.writing(out, f"the report folder {out}") as local:
        toy = names.read_copy(toy) if toy is not None else None
        if storage.is_remote(runs):
            parts = [f"sae/{lm}/layer{layer}"] + ([] if toy else ["toy"])
            runs = names.read_copy(runs, tuple(parts))
        report = build_report(
            runs,
            lm,
            layer,
            out=local,
            toy=toy,
            tolerance=tolerance,
            sets=sets,
            arch=arch,
            wandb_mode=wandb_mode,
            browse=browse,
            command=command,
        )
    return report, names


def pick_dictionary(side: Side):
    """The dictionary worth browsing: the last of the report's three signals that points to a
    cell (MMCS with larger ones, else SSLL, else dead neurons); when none reads (a grid below the
    minimum evidence), the largest dictionary at the middle knob value."""
    three = [p for p in side.diagnosis.pointers if p.diagnostic in (DEAD, SSLL, LARGER)]
    for p in reversed(three):
        if p.reading and p.knob is not None and (p.knob, p.size) in side.grid.cells:
            return (p.knob, p.size)
    if not side.grid.cells:
        return None
    values = sorted({a for a, _ in side.grid.cells})
    middle = values[(len(values) - 1) // 2]
    return max(k for k in side.grid.cells if k[0] == middle)


def _track(report: Report, record: dict, mode: str | None) -> None:
    lm = report.lm
    with Tracker(
        report.out,
        name=f"report-{report.out.name}",
        mode=mode,
        config={"sets": record["sets"], "source": lm.grid.source},
    ) as tracker:
        rows = lm.grid.rows()
        cols = [c for c in rows[0] if all(c in r for r in rows)]
        tracker.log_table("lm_grid", cols, [[r[c] for c in cols] for r in rows])
        for side in (report.lm, report.toy):
            if side is None:
                continue
            tracker.log_table(
                f"diagnostics/{'toy' if side is report.toy else 'lm'}",
                ["diagnostic", "knob", "size", "ratio", "lower_bound", "reading", "size_steps_off"],
                [
                    [
                        p.diagnostic,
                        p.knob,
                        p.size,
                        ratio_label(p.size, side.base) if p.size else None,
                        p.lower_bound,
                        p.reading,
                        p.match.get("size_steps_off"),
                    ]
                    for p in side.diagnosis.pointers
                ],
            )
        tracker.log_images({f"figures/{k}": v for k, v in report.figures.items()})
        est = record["lm"].get("estimate") or {}
        # the record's own fields, so an open estimate logs more_than and no low end
        summary = {
            f"lm/estimate_{k}": v
            for k, v in est.items()
            if k in ("more_than", "low", "median", "high") and v is not None
        }
        if est.get("no_estimate"):
            summary["lm/no_estimate"] = "; ".join(est["no_estimate"])
        rule = record["lm"].get("window_rule") or {}
        summary.update(
            {f"lm/window_rule/{k}": rule.get(k) for k in ("window", "steps_needed", "rate")}
        )
        if record["toy"]:
            summary.update(
                {
                    f"toy/{p['diagnostic']}/size_steps_off": p.get("size_steps_off")
                    for p in record["toy"]["pointers"]
                }
            )
        tracker.summary({**summary, "report": str(report.index)})
