"""Does each count signal follow the truth? Toy grids where the number of features is known.

Every cell below was fixed before any of them was read (seeds no test uses):
- core: G in {256, 512, 1,024} x relu, topk, batchtopk, matryoshka, jumprelu, on the default data
  (threshold copula, rho 0.5), seed 303 (15 grids);
- robustness at G 512: the report's correlation recipe and independent features for every
  architecture (seed 303), and a second seed (404) on the copula (15 grids);
- reach: G 2,048 for relu, topk, and the best k-architecture of the core table, batchtopk (3
  grids; batchtopk chosen by the rule at ``REACH_ARCHS``, the one choice made after reading
  other cells);
- zipf: G 512, Zipfian frequencies after SynthSAEBench (p 0.4 down to 5e-4, exponent 0.5: 9.1
  features active on average, so k 5, 10, 20 for topk), relu and topk (2 grids; added with the
  data kind, before any of its grids was read);
- hierarchy: G 512, the zipf cells' data with SynthSAEBench's trees on top (``--hierarchy``: 4
  roots, branching 4, depth 3, so 340 features in trees and 172 free; every sibling group there
  outweighs its parent, so a root's firing carries one whole root-to-leaf chain and 4.8 features
  are active on average: the core's k 3, 5, 8 for topk), relu and topk (2 grids; added with the
  data kind, before any of its grids was read). The truth is G, every node of every tree.
Each grid: h 256, sizes 1/4x..4x of G, 5,000 steps of 256, three knob values where the range is
known (relu: L1 1e-4, 3.2e-4, 1e-3, sum convention; the k-architectures: k 3, 5, 8 with AuxK;
jumprelu: L0 coefficients 6e-3, 1e-2, 2e-2), 262,144 held-out rows (so the window rule can
measure rates down to ~4e-5). Each grid is trained and saved into its run folder, then read by
the same code ``unsuperpose toy`` and ``analyze report`` use (``toy_record``): the window rule, the
minimum evidence, every signal.

Records: one ``calibration`` line per grid (every signal's pointer, steps off the truth, the
window by the rule and by the truth, CPU seconds), appended to ``runs/bench/calibration.jsonl``
as each grid finishes; a rerun skips the grids already there (same cell, same settings), so the
table can be built across sessions. Each grid's run folder stays under
``runs/bench/calibration/`` (about 100 MB at G 512): ``CAL_REREAD=1`` reads every finished folder
again without training, so a change to the analysis is measured on the same dictionaries.
``CAL_QUICK=1``: a smoke subset (h 64, G 64 and 128, relu and topk, 600 steps) into its own
file. ``CAL_CELLS=core`` (or robust, reach, zipf, hierarchy) picks a part.
At the end, ``calibration_table`` per (architecture, signal): cells within one grid step of G,
and the plot of pointer against G (``calibration.png`` beside the records).
``python -m benchmarks.bench_calibration [records] [--previous older-records] [--plot PNG]``
prints the README's table from the records (with an earlier rule's readings beside them).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.common import git_commit
from unsuperpose.analyze import grid_figures, score_grid
from unsuperpose.analyze.compare import ratio_label
from unsuperpose.analyze.diagnostics import DECLARED_READING, DEFAULT_READING
from unsuperpose.analyze.report import toy_record
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train import SAETrainConfig, parse_dict_sizes, run_grid
from unsuperpose.train.grid import JUMPRELU_OPTIONS
from unsuperpose.train.layout import is_finished

ARCHS = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")
KNOBS = {
    "relu": dict(sparsity=[1e-4, 3.1623e-4, 1e-3]),
    "topk": dict(sparsity=[3, 5, 8]),
    "batchtopk": dict(sparsity=[3, 5, 8]),
    "matryoshka": dict(sparsity=[3, 5, 8]),
    "jumprelu": dict(sparsity=[6e-3, 1e-2, 2e-2], jumprelu=JUMPRELU_OPTIONS),
}
# Zipfian data has ~9 features active on average at G 512: k values around it, not around 5
ZIPF_KNOBS = {"topk": dict(sparsity=[5, 10, 20])}
SIZES = "1/4x,1/2x,1x,2x,4x"
# Reach (G 2,048): relu, and the k-architecture whose default reading did best in the core table,
# by a rule fixed before its G 2,048 grid ran: the most core cells within one grid step, then the
# fewest steps off in all, then the simpler method. batchtopk and matryoshka both read 3 of 3
# (0, 0 and 1 steps off; topk misses G 1,024 by two); batchtopk is the simpler (Matryoshka is
# BatchTopK with nested prefix losses). topk was listed here before the core table existed, and
# stays: its grid was running when the rule was applied, and every cell run is reported.
REACH_ARCHS = ("relu", "topk", "batchtopk")


def cells(quick: bool) -> list[dict]:
    if quick:
        return [
            dict(part="quick", arch=a, G=g, h=64, data="copula", seed=303, steps=600)
            for g in (64, 128)
            for a in ("relu", "topk")
        ]
    out = [
        dict(part="core", arch=a, G=g, data="copula", seed=303)
        for g in (256, 512, 1024)
        for a in ARCHS
    ]
    out += [dict(part="robust", arch=a, G=512, data="report", seed=303) for a in ARCHS]
    out += [dict(part="robust", arch=a, G=512, data="independent", seed=303) for a in ARCHS]
    out += [dict(part="robust", arch=a, G=512, data="copula", seed=404) for a in ARCHS]
    out += [dict(part="reach", arch=a, G=2048, data="copula", seed=303) for a in REACH_ARCHS]
    out += [dict(part="zipf", arch=a, G=512, data="zipf", seed=303) for a in ("relu", "topk")]
    out += [
        dict(part="hierarchy", arch=a, G=512, data="hierarchy", seed=303) for a in ("relu", "topk")
    ]
    return [{"h": 256, "steps": 5000, **c} for c in out]


def toy_config(cell: dict) -> ToyConfig:
    data = {
        "copula": {},
        "report": {"correlation_recipe": "report"},
        "independent": {"correlation": 0.0},
        "zipf": {"frequencies": "zipf"},
        # the zipf cells plus the trees alone (the block copula kept), so the two parts differ
        # by the hierarchy only
        "hierarchy": {"frequencies": "zipf", "hierarchy": True},
    }[cell["data"]]
    return ToyConfig(h=cell["h"], G=cell["G"], seed=cell["seed"], **data)


def key(cell: dict) -> str:
    return json.dumps({k: cell[k] for k in sorted(cell) if k != "part"}, sort_keys=True)


def folder_name(cell: dict) -> str:
    return "-".join(f"{k}{cell[k]}" for k in ("arch", "G", "h", "data", "seed", "steps"))


def train_cell(cell: dict, folder: Path) -> dict:
    src = ToySource(toy_config(cell))
    G = cell["G"]
    sizes = [n for _, n in parse_dict_sizes(SIZES, G, bare="ratio")]
    cfg = SAETrainConfig(
        arch=cell["arch"],
        dict_sizes=sizes,
        steps=cell["steps"],
        seed=cell["seed"],
        data_seed=cell["seed"],
        dead_window=src.dead_window(256),  # the truth's window: training only (AuxK's)
        eval_rows=262_144 if cell["h"] >= 256 else 65_536,
        log_every=max(1, cell["steps"] // 50),  # enough points to show convergence
        **{**KNOBS[cell["arch"]], **ZIPF_KNOBS.get(cell["arch"], {})}
        if cell["data"] == "zipf"
        else KNOBS[cell["arch"]],
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    if not is_finished(folder):  # a finished folder is only read again
        run_grid(
            src,
            cfg,
            folder,
            size_labels={n: f"{n / G:g}x" for n in sizes},
            size_base=G,
            size_axis="x G",
            ground_truth=src.features,
            progress=False,
            run_name=folder.name,
            source_info=src.describe(),
            checkpoint_every=500,
            wandb_mode="disabled",
            score=score_grid,
            figures=grid_figures,
        )
    rec = toy_record(folder, G)
    pointers = {
        p["diagnostic"]: {
            "size": p["size"],
            "ratio": p["ratio"],
            "lower_bound": p["lower_bound"],
            "reading": p["reading"],
            "steps_off": p.get("size_steps_off"),
        }
        for p in rec["pointers"]
    }
    return {
        "figure": "calibration",
        **cell,
        "pointers": pointers,
        "default": rec["default_reading"]["diagnostic"],
        "estimate": {
            k: (rec.get("estimate") or {}).get(k) for k in ("median", "more_than", "no_estimate")
        },
        "rule_version": rec["window_rule"].get("rule_version"),
        "window_rule": rec["window_rule"]["window"],
        "window_truth": rec["window_rule"]["truth_window"],
        # the rule says a count reads the features firing at least about as often as its rate r:
        # how many true features do (a comparison only; the pointers are scored against G)
        "features_above_r": int((src.probs >= rec["window_rule"]["rate"]).sum())
        if rec["window_rule"].get("rate")
        else None,
        "rule_reason": rec["window_rule"]["reason"],
        "best_mmcs": round(rec["optimum"]["mmcs"], 4),
        "best_at_ratio": rec["optimum"]["ratio"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        # the code that read the grid (and trained it, unless it resumed across commits)
        "commit": git_commit(),
    }


def within_one_step(steps_off: int | None) -> bool:
    """A pointer that lands within one grid step of G (a bound or no reading has no steps off,
    so it does not)."""
    return steps_off is not None and steps_off <= 1


def table(records: list[dict]) -> Iterator[dict]:
    by: dict[tuple[str, str], list] = {}
    for r in records:
        for name, p in r["pointers"].items():
            by.setdefault((r["arch"], name), []).append(p)
    for (arch, name), ps in sorted(by.items()):
        offs = [p["steps_off"] for p in ps]
        yield {
            "figure": "calibration_table",
            "arch": arch,
            "signal": name,
            "grids": len(ps),
            "at_truth": sum(o == 0 for o in offs),
            "within_one_step": sum(map(within_one_step, offs)),
            "no_reading": sum(not p["reading"] for p in ps),
            "bounds": sum(p["lower_bound"] for p in ps),
        }


def run() -> Iterator[dict]:
    quick = os.environ.get("CAL_QUICK") == "1"
    parts = os.environ.get("CAL_CELLS")
    path = Path(
        os.environ.get("CAL_FILE", f"runs/bench/calibration{'-quick' if quick else ''}.jsonl")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = path.parent / path.stem
    reread = os.environ.get("CAL_REREAD") == "1"
    todo = [c for c in cells(quick) if not parts or c["part"] in parts.split(",")]
    cost = {}  # a re-read keeps what training the grid cost, and every record it does not redo
    if reread and path.exists():
        redo = {key(c) for c in todo if is_finished(runs / folder_name(c))}
        kept = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            cost[rec["key"]] = {k: rec[k] for k in ("wall_s", "cpu_s")}
            if rec["key"] not in redo:
                kept.append(line + "\n")
        path.write_text("".join(kept))
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            done[rec["key"]] = rec
    records = []
    for cell in todo:
        k = key(cell)
        if k in done:
            records.append(done[k])
            yield {**done[k], "resumed": True}
            continue
        folder = runs / folder_name(cell)
        if reread and not is_finished(folder):
            continue
        rec = {**train_cell(cell, folder), **cost.get(k, {}), "key": k}
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
        yield rec
    yield from table(records)
    yield {"figure": "calibration_plot", "path": str(plot(records, path.with_suffix(".png")))}


SIGNALS = (
    "dead neurons",
    "loss stickiness (SSLL)",
    "MMCS with larger dictionaries",
    "live latents",
    "measured latents",
    "novel latents",
    "Matryoshka prefix knee",
)


def _cell_text(p: dict | None) -> str:
    if p is None:
        return "–"
    if not p["reading"]:
        return "no reading"
    if p["size"] is None:
        return "none"
    at = f"{'>' if p['lower_bound'] else ''}{p['ratio']:g}x"
    return f"**{at}**" if p["steps_off"] == 0 else at


def markdown(records: list[dict], previous: list[dict] | None = None) -> str:
    """The README's table: one row per grid, each signal's pointer as a ratio of G (bold: at
    the truth; '>': a lower bound), the default reading marked, the windows and the cost.
    ``previous``: the same grids read under an earlier window rule, shown as one more column
    (its window and its default reading) so a revision's effect is visible cell by cell."""
    before = {r["key"]: r for r in previous or []}
    head = [
        "arch",
        "G",
        "data, seed",
        "window: rule / truth",
        "true features above r",
        *SIGNALS,
        *(["earlier rule: window, default"] if previous else []),
        "best MMCS (at)",
        "CPU min",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = []
        for name in SIGNALS:
            text = _cell_text(r["pointers"].get(name))
            cells.append(f"{text} (default)" if name == DEFAULT_READING[r["arch"]] else text)
        window = f"{r['window_rule'] or '–'} / {r['window_truth']}"
        if previous:
            old = before.get(r["key"])
            cells.append(
                f"{old['window_rule'] or '–'}, {_cell_text(old['pointers'].get(old['default']))}"
                if old
                else "not read"
            )
        lines.append(
            "| "
            + " | ".join(
                [
                    r["arch"],
                    f"{r['G']:,}",
                    f"{r['data']}, {r['seed']}",
                    window,
                    f"{r['features_above_r']:,}" if r.get("features_above_r") else "–",
                    *cells,
                    f"{r['best_mmcs']:.3f} ({r['best_at_ratio']:g}x)",
                    f"{r['cpu_s'] / 60:.0f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def decide_defaults(records: list[dict], declared: dict[str, str]) -> dict[str, dict]:
    """The rule for changing a default reading, as written before the full table was read:
    an architecture keeps its declared default if that signal lands within one grid step of G in
    every one of its grids; otherwise the default becomes a signal that does, the one with the
    most grids at the truth when several do; if none does, the declared default stays and the
    architecture has no calibrated reading. A lower bound or no reading is not within a step.

    Per architecture: ``declared``, ``default`` (after the rule), ``calibrated`` (whether the
    default landed within one step in every grid), ``grids``, and per signal the grids within one
    step and at the truth (``signals``)."""
    by_arch: dict[str, list[dict]] = {}
    for r in records:
        by_arch.setdefault(r["arch"], []).append(r)
    out = {}
    for arch, recs in sorted(by_arch.items()):
        signals = {}
        for name in SIGNALS:
            offs = [r["pointers"][name]["steps_off"] for r in recs if name in r["pointers"]]
            if len(offs) == len(recs):  # a signal read in every grid of the architecture
                signals[name] = {
                    "within_one_step": sum(map(within_one_step, offs)),
                    "at_truth": sum(o == 0 for o in offs),
                }
        every = [n for n, c in signals.items() if c["within_one_step"] == len(recs)]
        old = declared[arch]
        if old in every:
            new = old
        elif every:
            # most grids at the truth; a tie goes to the signal listed first in SIGNALS
            new = max(every, key=lambda n: (signals[n]["at_truth"], -SIGNALS.index(n)))
        else:
            new = old
        out[arch] = {
            "declared": old,
            "default": new,
            "calibrated": new in every,
            "grids": len(recs),
            "signals": signals,
        }
    return out


def calibration_summary(records: list[dict], defaults: dict[str, str]) -> dict[str, dict]:
    """How each architecture's default reading (``defaults``) fared, in the form
    ``analyze.diagnostics.CALIBRATION`` keeps and the report prints: its grids, how many it read
    within one grid step of G and at G, and each miss ("G 1,024, copula, seed 303: 1/4x")."""
    out = {}
    for r in records:
        name = defaults[r["arch"]]
        p = r["pointers"][name]
        c = out.setdefault(
            r["arch"],
            {"reading": name, "grids": 0, "within_one_step": 0, "at_truth": 0, "misses": []},
        )
        c["grids"] += 1
        off = p["steps_off"]
        c["within_one_step"] += within_one_step(off)
        c["at_truth"] += off == 0
        if not within_one_step(off):
            said = (
                "no reading"
                if not p["reading"]
                else "none"
                if p["ratio"] is None
                else f"{'more than ' if p['lower_bound'] else ''}{ratio_label(p['size'], r['G'])}"
            )
            c["misses"].append(f"G {r['G']:,}, {r['data']}, seed {r['seed']}: {said}")
    return dict(sorted(out.items()))


def decision_markdown(decision: dict[str, dict]) -> str:
    """The decision as a table: per architecture, the declared and the resulting default, and
    how each landed (grids within one step of G / at G, of all its grids)."""
    lines = [
        "| arch | grids | declared default: within one step, at G | default after the rule | "
        "within one step, at G | calibrated |",
        "|---|---|---|---|---|---|",
    ]

    def landed(d: dict, name: str) -> str:
        c = d["signals"].get(name)
        return f"{c['within_one_step']}, {c['at_truth']}" if c else "not read everywhere"

    for arch, d in decision.items():
        lines.append(
            f"| {arch} | {d['grids']} | {d['declared']}: {landed(d, d['declared'])} | "
            f"{d['default']} | {landed(d, d['default'])} | {'yes' if d['calibrated'] else 'no'} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> Path:
    """Pointer against G, one panel per architecture, on the core and reach cells (copula, one
    seed, G 256 to 2,048): every signal's pointer (hollow: a lower bound), the default reading
    (``DEFAULT_READING``, after the calibration's decision) joined by a line, the truth as the
    diagonal. A pointer that follows the truth lies on it at every G."""
    from unsuperpose.analyze.figures import plt, save_figure

    core = [r for r in records if r.get("part") in ("core", "reach")]  # copula, seed 303
    archs = [a for a in ARCHS if any(r["arch"] == a for r in core)]
    if not archs:
        return path
    fig, axes = plt.subplots(1, len(archs), figsize=(3.1 * len(archs), 3.2), squeeze=False)
    markers = dict(zip(SIGNALS, "osD^XvP", strict=True))
    for ax, arch in zip(axes[0], archs, strict=True):
        rows = sorted((r for r in core if r["arch"] == arch), key=lambda r: r["G"])
        gs = [r["G"] for r in rows]
        ax.plot([min(gs) / 4, max(gs) * 4], [min(gs) / 4, max(gs) * 4], color="0.8", lw=1)
        for i, name in enumerate(SIGNALS):
            pts = [(r["G"], r["pointers"].get(name), DEFAULT_READING[arch] == name) for r in rows]
            pts = [(g, p, d) for g, p, d in pts if p and p["reading"] and p["size"]]
            if not pts:
                continue
            jitter = 1 + 0.04 * (i - len(SIGNALS) / 2)  # signals at one G side by side
            for g, p, _ in pts:
                ax.scatter(
                    g * jitter,
                    p["size"],
                    marker=markers[name],
                    s=28,
                    facecolors="none" if p["lower_bound"] else f"C{i}",
                    edgecolors=f"C{i}",
                    label=name,
                )
            default = [(g, p["size"]) for g, p, d in pts if d]
            if default:
                ax.plot(*zip(*default, strict=True), color="k", lw=1.2, alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(arch)
        ax.set_xlabel("G (the truth)")
    axes[0][0].set_ylabel("pointer (dictionary size)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        h, lab = ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    seen = dict(zip(labels, handles, strict=True))
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=len(seen), fontsize=7)
    return save_figure(fig, path, rect=(0, 0.1, 1, 1))


if __name__ == "__main__":  # the README's table (and, with --plot PATH, its figure)
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default="runs/bench/calibration.jsonl")
    parser.add_argument("--previous", help="records of the same grids under an earlier rule")
    parser.add_argument("--plot", help="write the pointer-against-G figure here (PNG)")
    args = parser.parse_args()

    def load(file: str) -> list[dict]:
        return [json.loads(line) for line in Path(file).read_text().splitlines() if line.strip()]

    recs = load(args.file)
    print(markdown(recs, load(args.previous) if args.previous else None))
    print()
    print(decision_markdown(decide_defaults(recs, DECLARED_READING)))
    if args.plot:
        print(f"figure: {plot(recs, Path(args.plot))}")
