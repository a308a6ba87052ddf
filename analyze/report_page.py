"""The report's index.html: verdicts first, then figures, tables, provenance and commands."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from unsuperpose.analyze.compare import ratio_label
from unsuperpose.analyze.diagnostics import calibration_text
from unsuperpose.analyze.html import Raw, esc, fmt, image, page, table, write
from unsuperpose.train.config import SAETrainConfig
from unsuperpose.train.layout import CONFIG_FILE, set_dict_spec
from unsuperpose.train.registry import DEFAULT_ARCH, get_family

GRID_COLUMNS = [
    "l1",
    "dict_size",
    "dict_ratio",
    "steps",
    "samples",
    "heldout_rows",
    "heldout_mse",
    "heldout_fvu",
    "heldout_l1_loss",
    "heldout_l0",
    "delta_ce",
    "delta_ce_se",
    "ce_loss_recovered",
    "ce_loss_recovered_mean",
    "kl",
    "norm_ratio",
    "relative_reconstruction_bias",
    "dead",
    "ssll",
    "mmcs_larger",
    "mmcs",
    "mcc",
    "set",
]

FIGURE_TEXT = {
    "compare_dead": "Dead latents. Past the number of features there are to find, extra latents "
    "have nothing to learn and die; boxes mark, per L1, the largest dictionary "
    "without dead latents.",
    "compare_ssll": "Loss stickiness: held-out log reconstruction loss and log L1 loss, each "
    "standardised over the whole grid, summed (the report's figure); the box marks "
    "the smallest dictionary whose log reconstruction loss plus log L1 loss, "
    "unweighted (each cell's own), has an interior minimum over L1 (a basin).",
    "compare_mmcs_larger": "MMCS with larger dictionaries: how well each dictionary's atoms "
    "reappear in the larger ones at the same L1 (no ground truth needed); "
    "the box marks the peak.",
}


def _where(p, base: int, knob: str = "L1") -> str:
    if not p.reading:
        return "no reading"
    if p.size is None:
        return "nowhere in the grid"
    if p.lower_bound:
        return (
            f"more than {ratio_label(p.size, base)} (more than {p.size:,} latents): grow the grid"
        )
    at = f"{knob} {p.knob:g}, " if p.knob is not None else ""
    return f"{at}{ratio_label(p.size, base)} ({p.size:,} latents)"


def _verdict(match: dict) -> Raw:
    if "size_steps_off" not in match:
        return Raw("-")
    off = match["size_steps_off"]
    if off is None:
        return Raw('<span class="no">no</span> (no size inside the grid)')
    if off == 0:
        return Raw('<span class="ok">yes</span>')
    return Raw(f'<span class="{"ok" if off <= 1 else "no"}">{off} size step(s) off</span>')


def _n(v) -> str:
    return f"{v:,}" if float(v).is_integer() else f"{v:,.1f}"


def estimate_text(est: dict | None, base: int, name: str, knob: str = "L1") -> str:
    """One sentence for the estimate; an open upper end is printed as a bound, never a number,
    and a grid below the minimum evidence gets no estimate, with the reasons."""
    if est and est.get("no_estimate"):
        return f"{name}: no estimate: " + "; ".join(est["no_estimate"]) + "."
    if not est:
        return (
            f"{name}: no diagnostic points inside this grid; "
            f"train larger dictionaries or more {knob} values."
        )
    if est["more_than"] is not None:
        pointed = (
            f" (the other diagnostics point to {', '.join(f'{s:,}' for s in est['sizes'])})"
            if est["sizes"]
            else ""
        )
        basis = est.get("basis") or []
        if basis and "dead neurons" not in basis:
            why = f"{', '.join(basis)} still grow at the largest sizes trained"
            grow = "the grid must grow until they stop"
        else:
            why = f"at some {knob} even the largest dictionary trained there keeps its latents"
            grow = f"the grid must grow at that {knob} until latents die"
        return (
            f"{name}: more than {est['more_than']:,} features "
            f"({ratio_label(est['more_than'], base)} of {base}): {why}, "
            f"so nothing bounds the number from above{pointed}; {grow}."
        )
    same = est["low"] == est["high"]
    rng = f"{est['low']:,}" if same else f"{est['low']:,}–{est['high']:,}"
    ratios = (
        ratio_label(est["low"], base)
        if same
        else f"{ratio_label(est['low'], base)}–{ratio_label(est['high'], base)}"
    )
    basis = est.get("basis") or []
    by = f" ({', '.join(basis)})" if basis else ""
    return (
        f"{name}: the diagnostics{by} point to dictionaries of {rng} latents ({ratios} of {base}); "
        f"taken at face value about {_n(est['median'])} features (the median of "
        f"{', '.join(f'{s:,}' for s in est['sizes'])})."
    )


def lm_estimate_line(report_dir: str | Path) -> str | None:
    """The LM's estimate as a written report's ``diagnosis.json`` has it (its window rule and
    minimum evidence applied), in one line; None when no report is there."""
    path = Path(report_dir) / "diagnosis.json"
    if not path.exists():
        return None
    lm = json.loads(path.read_text())["lm"]
    rule = lm.get("window_rule") or {}
    text = "LM estimate: " + estimate_text(lm.get("estimate"), lm["base"], path.parent.name)
    if rule.get("window"):
        text += (
            f" Dead window by the rule: {rule['window']:,} batches; "
            f"{rule['steps']:,} steps trained, {rule['steps_needed']:,} needed."
        )
    calibration = (lm.get("default_reading") or {}).get("calibration_text")
    return f"{text}\n{calibration}" if calibration else text


def _reading(row: dict | None) -> str:
    if row is None or row["size"] is None:
        return "none"
    return f"more than {row['size']:,}" if row["lower_bound"] else f"{row['size']:,}"


def window_text(diagnosis) -> str:
    """The dead window the run's observables call for, and whether the grid is long enough."""
    rule = diagnosis.rule
    if rule is None:
        return ""
    if rule.window is None:
        return f"Dead window: none ({rule.reason})."
    truth = (
        f"; the training window (the truth's unless --dead-window set it), for comparison: "
        f"{rule.truth_window:,}"
        if rule.truth_window
        else ""
    )
    return (
        f"Dead window {rule.window:,} batches of {rule.batch_size:,} (the rule: rare measured "
        f"latents fire on {rule.rate:.2g} of {rule.heldout_rows:,} held-out rows, so the "
        f"count reads features at least about that frequent){truth}; "
        f"the grid trained {rule.steps:,} steps, at least {rule.steps_needed:,} needed."
    )


def below_evidence(diagnosis) -> bool:
    """The grid is below the minimum evidence: what is printed of it is for reference only."""
    return diagnosis.rule is not None and not diagnosis.rule.readable


def sensitivity_text(diagnosis) -> str:
    """How the dead-neuron pointer moves with the tolerance at the run's window, e.g. "512 at
    tolerance 0 (the report's rule), 1,024 at 0.5%, 1,024 at 1% (the default)"."""
    rows = [r for r in diagnosis.sensitivity if r["window"] == diagnosis.window]
    if not rows:
        return ""
    parts = []
    for r in rows:
        tags = (["the report's literal rule"] if r["tolerance"] == 0 else []) + (
            ["the default reading"] if r["tolerance"] == diagnosis.dead.tolerance else []
        )
        tag = f" ({', '.join(tags)})" if tags else ""
        parts.append(f"{_reading(r)} at tolerance {r['tolerance']:.1%}{tag}")
    return f"Dead-neuron pointer, window {diagnosis.window:,} batches: " + ", ".join(parts) + "."


def _num(v) -> bool:
    return isinstance(v, (int, float)) and v == v  # a number, not NaN


def ablation_text(rows: list[dict], name: str, hook: str | None) -> str:
    """The yardsticks CE loss recovered is read against: the model's clean CE on its validation
    documents and what zero- and mean-ablating the hook costs, from the spliced-in evaluation
    with the most tokens ("" when no dictionary was spliced in). CE recovered near 1 means little
    when ablating the layer costs little (the tiny LM: 0.08 nats at layer 3)."""
    spliced = [r for r in rows if all(_num(r.get(c)) for c in ("ce_clean", "ce_zero", "ce_mean"))]
    if not spliced:
        return ""
    r = max(spliced, key=lambda r: r.get("splice_tokens") or 0)
    clean, zero, mean = r["ce_clean"], r["ce_zero"], r["ce_mean"]
    tokens = f"{int(r['splice_tokens']):,} " if _num(r.get("splice_tokens")) else ""
    what = hook or "the hook"
    cost = zero - clean
    per_point = (
        f" One point of CE loss recovered is {cost / 100:.4f} nats here." if cost > 0 else ""
    )
    return (
        f"{name}: clean CE {clean:.3f} nats per token on {tokens}predicted tokens of its "
        f"validation documents. Zero-ablating {what} raises it to {zero:.3f} nats "
        f"(+{cost:.3f}); mean-ablating it (the store's mean) to {mean:.3f} nats "
        f"(+{mean - clean:.3f}). CE loss recovered is 1 at the clean CE and 0 at the zero "
        f"ablation (its _mean variant: 0 at the mean ablation), so a dictionary's delta CE "
        f"reads against these costs.{per_point}"
    )


def summary_html(report) -> str:
    lm, toy = report.lm, report.toy
    report_ssll = [n for n, a in lm.diagnosis.report_basins.items() if a is not None]
    ssll_note = (
        f" SSLL read with the report's grid-wide z-scores instead (grid-dependent): "
        f"{min(report_ssll):,} latents."
        if report_ssll
        else " SSLL read with the report's grid-wide z-scores: no basin."
    )
    beside = (
        ""
        if below_evidence(lm.diagnosis)
        else f" {esc(sensitivity_text(lm.diagnosis))}{esc(ssll_note)}"
    )
    parts = [
        "<p><b>Estimate.</b> "
        + esc(estimate_text(lm.diagnosis.estimate(), lm.base, lm.name, lm.grid.knob_label))
        + f" {esc(window_text(lm.diagnosis))}{beside}</p>",
        f"<p><b>Calibration.</b> {esc(calibration_text(lm.grid.arch))}</p>",
    ]
    ablation = ablation_text(lm.grid.rows(), lm.name, lm.grid.source.get("hook"))
    if ablation:
        parts.append(f"<p><b>The model's loss, clean and ablated.</b> {esc(ablation)}</p>")
    if toy is not None and toy.diagnosis.truth_size is not None:
        offs = [p.match.get("size_steps_off") for p in toy.diagnosis.pointers if p.reading]
        hits = sum(o == 0 for o in offs)
        near = sum(o is not None and o <= 1 for o in offs)
        opt = ""
        if toy.diagnosis.optimum is not None:
            a, n = toy.diagnosis.optimum
            opt = (
                f" The best recovery is at {toy.grid.knob_label} {a:g}, "
                f"{ratio_label(n, toy.base)} ({n:,} latents, "
                f"MMCS {toy.diagnosis.optimum_mmcs:.3f})."
            )
        parts.append(
            f"<p><b>Toy data (G = {toy.base} true features):</b> {hits} of "
            f"{len(offs)} signals with a reading point to 1x, {near} within one size "
            f"step. {esc(window_text(toy.diagnosis))}{esc(opt)}</p>"
        )
    return "".join(parts)


def diagnostics_table(report) -> str:
    lm, toy = report.lm, report.toy
    rows = []
    toy_by = {q.diagnostic: q for q in toy.diagnosis.pointers} if toy else {}
    lm_by = {q.diagnostic: q for q in lm.diagnosis.pointers}
    names = list(lm_by) + [n for n in toy_by if n not in lm_by]
    for name in names:
        p, tp = lm_by.get(name), toy_by.get(name)
        rows.append(
            [
                name + (" (default)" if p is not None and p.default else ""),
                _where(tp, toy.base, toy.grid.knob_label) if tp else "-",
                (_verdict(tp.match) if tp.reading else "-") if tp else "-",
                _where(p, lm.base, lm.grid.knob_label) if p else "-",
                p.why if p else tp.why,
            ]
        )
    return table(
        ["diagnostic", "toy: points to", "toy: at the truth (1x)?", f"{lm.name}: points to", "how"],
        rows,
        left=5,
    )


def dead_table(report) -> str:
    out = []
    for side in (report.toy, report.lm):
        if side is None:
            continue
        d = side.diagnosis.dead
        if below_evidence(side.diagnosis):
            out.append(
                f"<p><i>{esc(side.name)}: below the minimum evidence ("
                f"{esc(side.diagnosis.rule.reason)}); the tables below are for reference, "
                "not a reading.</i></p>"
            )
        rows = [
            [
                f"{a:g}",
                ratio_label(n, side.base) + f" ({n:,})" if n else "none",
                f"{ratio_label(d.largest[a], side.base)} ({d.largest[a]:,})",
                "yes" if a in d.all_alive else "no",
            ]
            for a, n in d.per_knob.items()
        ]
        out.append(
            f"<h3>{esc(side.name)}</h3>"
            + table(
                [
                    side.grid.knob_label,
                    f"largest dictionary with at most {d.tolerance:.1%} dead latents",
                    "largest trained",
                    "open-ended (its largest passes)",
                ],
                rows,
                left=4,
            )
        )
        sens = side.diagnosis.sensitivity
        if sens:
            windows = sorted({r["window"] for r in sens})
            tols = sorted({r["tolerance"] for r in sens})
            cell = {(r["window"], r["tolerance"]): _reading(r) for r in sens}
            out.append(
                f"<p>Where the pointer lands for other tolerances and dead windows (in "
                f"training batches; the run's window is {side.diagnosis.window})</p>"
                + table(
                    ["window"] + [f"tolerance {t:.1%}" for t in tols],
                    [[f"{w:,}"] + [cell.get((w, t), "-") for t in tols] for w in windows],
                    left=1,
                )
            )
    return "".join(out)


def grid_table(side) -> str:
    rows = side.grid.rows()
    cols = [c for c in GRID_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        r["dict_ratio"] = ratio_label(r["dict_size"], side.base)
    return table(cols, [[r.get(c) for c in cols] for r in rows], left=0)


def commands(report, command: str | None) -> list[str]:
    """Commands that reproduce the inputs, rebuilt from the configs saved beside them."""
    q = shlex.quote
    src = report.lm.grid.source
    cmds = []
    if src.get("model_dir"):
        store = Path(src.get("path", ""))
        cmds.append(
            f"unsuperpose harvest --lm {q(src['model_dir'])} --layer {src.get('layer')} "
            f"--out {q(str(store.parent))} --tokens {src.get('rows')}"
        )
    for s in report.lm.grid.sets:
        cfg_path = s / CONFIG_FILE
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        dict_spec = set_dict_spec(s.name, cfg.get("arch", DEFAULT_ARCH))
        cmds.append(
            f"unsuperpose train --store {q(src.get('path', '?'))} "
            f"--dict-sizes {q(dict_spec)} --out {q(str(s.parent))}"
            + (
                f"{knob_flags(cfg)} --steps {cfg.get('steps')} --batch-size {cfg.get('batch_size')}"
                if cfg
                else ""
            )
        )
    if report.toy is not None:
        t = report.toy.grid.source
        cfg_path = report.toy.grid.sets[0] / CONFIG_FILE
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        sizes = ",".join(
            ratio_label(n, report.toy.base)
            for n in sorted({c.n for c in report.toy.grid.cells.values()})
        )
        cmds.append(
            f"unsuperpose toy --out {q(str(report.toy.grid.sets[0]))} "
            f"--h {t.get('h')} --g {t.get('G')} --k {t.get('k')} --steps {cfg.get('steps')}"
            f"{knob_flags(cfg)} --dict-sizes {sizes}"
        )
    cmds.append(command or "unsuperpose analyze report")
    return cmds


def knob_flags(cfg: dict) -> str:
    """' --l1 1e-3,3e-3' for a relu run's train_config, ' --arch topk --topk 8,16' for others."""
    saved = SAETrainConfig.upgrade_saved(dict(cfg))  # older files: one field per knob
    family = get_family(saved.get("arch", DEFAULT_ARCH))
    values = ",".join(family.knob.text(a) for a in saved.get("sparsity") or [])
    arch = f" --arch {family.name}" if family.name != DEFAULT_ARCH else ""
    return f"{arch} {family.knob.flag} {values}"


def provenance(report) -> str:
    src = report.lm.grid.source
    corpus = src.get("corpus")
    rows = [
        ["model", src.get("model_dir", "?")],
        ["weights sha256", src.get("weights_sha256", "?")],
        ["layer / hook", f"{src.get('layer')} / {src.get('hook')}"],
        ["tokens (store rows)", fmt(src.get("rows"))],
        ["context length", src.get("n_ctx", "?")],
        ["activation width d", report.lm.base],
        ["store", src.get("path", "?")],
        ["corpus", json.dumps(corpus) if corpus else "?"],
        ["dictionary sets", ", ".join(str(p) for p in report.lm.grid.sets)],
    ]
    if report.toy is not None:
        rows.append(
            ["toy run", f"{report.toy.grid.sets[0]} ({json.dumps(report.toy.grid.source)})"]
        )
    return table(["", ""], rows, left=2)


def render_index(report, *, command: str | None = None) -> Path:
    figs = report.figures
    lm = report.lm
    knob = lm.grid.knob_label
    body = [
        f"<h1>unsuperpose report: {esc(lm.name)} ({esc(lm.grid.arch)} dictionaries)</h1>",
        summary_html(report),
        "<h2>Where the diagnostics point</h2>",
        diagnostics_table(report),
        f"<h3>Dead neurons: largest dictionary that passes, per {knob}</h3>",
        dead_table(report),
        "<h2>Toy data and the LM side by side</h2>",
        f"<p>Same axes in both panels: {knob} upwards, dictionary size to the right as a ratio "
        "(of G for toy data, of d for the LM).</p>",
    ]
    for key in ("compare_dead", "compare_ssll", "compare_mmcs_larger"):
        text = FIGURE_TEXT[key].replace("L1", knob).replace(f"log {knob} loss", "log L1 loss")
        body += [f"<p>{esc(text)}</p>", image(figs[key], key)]
    if report.features:
        links = " · ".join(
            f'<a href="features/{esc(p.name)}">{esc(name)}</a>'
            for name, p in report.features.items()
        )
        body.append(
            "<h2>Feature browser</h2>"
            f"<p>For {esc(str(report.feature_dict))} (where the diagnostics point) "
            f"and the MLP neurons as the baseline: {links}</p>"
        )
    if any(k.startswith("lm_frontier_") for k in figs):
        body.append(
            "<h2>The sparsity–fidelity frontier</h2><p>Each dictionary size is a line through "
            "its L1 values: further left is sparser, lower is more faithful. Delta CE is the "
            "LM's loss with the SAE spliced in minus its clean loss, on its validation "
            "documents; the stars are the neuron basis (all d neurons, nothing lost) and the "
            "ablations (nothing kept).</p>"
        )
        body += [image(p, k) for k, p in figs.items() if k.startswith("lm_frontier_")]
    body.append(f"<h2>{esc(lm.name)}: the grid</h2>")
    body += [image(p, k) for k, p in figs.items() if k.startswith("lm_heatmap_")]
    body.append(grid_table(lm))
    if report.toy is not None:
        body.append("<h2>Toy data: the grid</h2>")
        if "toy_heatmap_mmcs" in figs:
            body.append(image(figs["toy_heatmap_mmcs"], "toy MMCS"))
        body.append(grid_table(report.toy))
    if report.notes:
        body.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>"
        )
    body += [
        "<h2>Provenance</h2>",
        provenance(report),
        "<h3>Commands</h3>",
        "<pre>" + esc("\n".join(commands(report, command))) + "</pre>",
        f'<p class="note">written by unsuperpose in {esc(os.getcwd())}</p>',
    ]
    return write(report.index, page(f"unsuperpose report: {lm.name}", "".join(body)))
