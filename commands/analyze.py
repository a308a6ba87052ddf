"""`unsuperpose analyze`: the report over an LM store's dictionaries, and the feature browser.

    unsuperpose analyze report --runs runs --lm tiny --layer 1
    unsuperpose analyze features --dictionary runs/sae/tiny/layer1/8x/saes/relu-n512-l1_0.001
    unsuperpose analyze splice --dictionary runs/sae/tiny/layer1/1x+2x+4x+8x [--tokens N]

The feature browser turns a store's token ids back into text with the tokenizer of the model that
was harvested (recorded with the store). Each subcommand parses its flags, calls one function of
``unsuperpose.analyze`` and prints what it wrote.
"""

from __future__ import annotations

import argparse
import shlex
import warnings
from pathlib import Path

from unsuperpose import distributed, storage
from unsuperpose.analyze.diagnostics import DEFAULT_TOLERANCE, calibration_text
from unsuperpose.analyze.remote import copies
from unsuperpose.commands.errors import in_flags, stage_errors
from unsuperpose.commands.flags import FlagDeprecation, alias
from unsuperpose.train.layout import report_dirname
from unsuperpose.train.registry import DEFAULT_ARCH, FAMILIES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="the analysis report and the feature browser",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    acts = p.add_subparsers(dest="analyze_command", required=True, metavar="ACTION")

    r = acts.add_parser(
        "report",
        help="report over every dictionary set of one store, beside the toy run",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Read every dictionary set under RUNS/sae/LM/layerL/*/ (and the toy run), "
        "draw the heatmaps and the toy-vs-LM comparison, say where the three "
        "diagnostics point, and write RUNS/report/LM-layerL/index.html.",
    )
    r.add_argument(
        "--runs",
        type=storage.location,
        default=Path("runs"),
        help="the runs folder every stage writes to, a folder or s3://...",
    )
    r.add_argument("--lm", default="tiny", help="LM name (the folder under RUNS/sae/)")
    r.add_argument("--layer", default="1", help="layer whose dictionaries to report on")
    r.add_argument(
        "--toy",
        type=storage.location,
        default=None,
        help="toy run to compare with (default RUNS/toy)",
    )
    r.add_argument(
        "--out",
        type=storage.location,
        default=None,
        help="report folder, a folder or s3://... (default RUNS/report/LM-layerL)",
    )
    r.add_argument(
        "--dead-tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="a dictionary counts as without dead latents if at most this fraction of its "
        "latents are dead (0: none at all, the report's literal rule, which is "
        "printed beside this reading in any case)",
    )
    r.add_argument(
        "--arch",
        default=DEFAULT_ARCH,
        choices=sorted(FAMILIES),
        help="read the dictionary sets of this architecture (a grid is one architecture); "
        "the report goes to RUNS/report/LM-layerL-ARCH for any but relu",
    )
    r.add_argument(
        "--sets",
        type=lambda t: [s for s in t.split(",") if s],
        default=None,
        help="read only these dictionary sets (folder names under RUNS/sae/LM/layerL/, "
        "comma-separated; default: every set there)",
    )
    r.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also build the feature browser for the dictionary the diagnostics point to",
    )
    _browser_arguments(r)
    r.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default=None,
        help="W&B mode (default: $WANDB_MODE, else offline)",
    )
    r.set_defaults(func=run)

    m = acts.add_parser(
        "methods",
        help="every method of one layer compared: SAEs against neurons, PCA, ICA, ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Read every dictionary set under RUNS/sae/LM/layerL/ whatever its method "
        "(SAE architectures and fitted baselines), draw the L0-FVU and L0-dCE frontiers, "
        "compare at matched L0, score the interpretability of one dictionary per method "
        "(token concentration; the one nearest the target L0) beside the store's neurons, and "
        "write RUNS/report/LM-layerL-methods/index.html.",
    )
    m.add_argument(
        "--runs",
        type=storage.location,
        default=Path("runs"),
        help="the runs folder every stage writes to, a folder or s3://...",
    )
    m.add_argument("--lm", default="tiny", help="LM name (the folder under RUNS/sae/)")
    m.add_argument("--layer", default="1", help="layer whose dictionaries to compare")
    m.add_argument(
        "--out",
        type=storage.location,
        default=None,
        help="output folder, a folder or s3://... (default RUNS/report/LM-layerL-methods)",
    )
    m.add_argument(
        "--target-l0",
        type=float,
        default=None,
        help="the L0 at which one dictionary per method is browsed and scored "
        "(default: d / 8, d the activation width)",
    )
    m.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build the feature browser of the picked dictionaries (their token concentration)",
    )
    _browser_arguments(m)
    m.set_defaults(func=run)

    f = acts.add_parser(
        "features",
        help="feature browser: an HTML page per dictionary, plus the MLP neurons",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Per latent: firing frequency, activation histogram and the "
        "top-activating contexts from the store's tokens; the same for the "
        "store's neurons as the baseline. One pass over the store, in chunks.",
    )
    _dict_argument(f)
    f.add_argument(
        "--store",
        type=storage.location,
        default=None,
        help="activation store to read, a folder or s3://... (default: the one the "
        "dictionary was trained on)",
    )
    f.add_argument(
        "--out",
        type=storage.location,
        default=None,
        help="output folder, a folder or s3://... (default DICT/features)",
    )
    _browser_arguments(f)
    f.set_defaults(func=run)

    sp = acts.add_parser(
        "splice",
        help="the SAE spliced into its LM: CE loss recovered, delta CE, KL, shrinkage",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Replace the hook's activation with each SAE's reconstruction "
        "and measure the LM's next-token loss against the clean, zero- and "
        "mean-ablated model, on the LM's validation documents or a text file.",
    )
    _dict_argument(sp)
    sp.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="a local text file, documents separated by blank lines, used whole "
        "(default: the LM's held-out validation documents)",
    )
    sp.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="predicted tokens of the validation documents to use (default 16,384); "
        "ignored with --corpus",
    )
    sp.add_argument("--batch-size", type=int, default=4, help="token blocks per forward pass")
    sp.add_argument("--device", default="auto", help=distributed.DEVICE_HELP)
    sp.add_argument(
        "--out",
        type=storage.location,
        default=None,
        help="output folder for splice.json, a folder or s3://... (default: the dictionary's "
        "folder); a path ending in .json is still read as the file itself, with a warning",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=_run_splice)


# The keywords the analyze stage's messages write (``sets='8x'``, ``store='...'``) -> the flags of
# `analyze report` and `analyze features` that set them.
FLAGS = {
    "sets": "--sets",
    "arch": "--arch",
    "toy": "--toy",
    "store": "--store",
    "top": "--top",
    "endpoint": "--autointerp-endpoint",
    "key_env": "--autointerp-key-env",
    "units": "--autointerp-units",
    "explain": "--autointerp-explain",
    "score": "--autointerp-score",
}
# The splice's own settings; the model and corpus errors speak of the ones the dictionary
# recorded, which no flag of it sets.
SPLICE_FLAGS = {"corpus": "--corpus", "tokens": "--tokens"}


def _output(args: argparse.Namespace):
    """Where this analysis writes (the defaults of ``run``, ``_run_methods`` and the splice)."""
    if args.analyze_command == "features":
        return args.out or args.dict_path / "features"
    if args.analyze_command == "splice":
        return splice_file(args.out, args.dict_path)
    if args.analyze_command == "methods":
        return args.out or args.runs / "report" / f"{args.lm}-layer{args.layer}-methods"
    return args.out or args.runs / "report" / report_dirname(args.lm, args.layer, args.arch)


def kept(args: argparse.Namespace) -> str:
    """What an analysis keeps across an I/O fault (the CLI's one-line error says it): it only
    reads the runs, and writes each of its own files whole, so the rerun writes them again."""
    return (
        "every run it reads, unchanged (analysis only reads them); of "
        f"{_output(args)}, only whole files, which the rerun writes again"
    )


def _run_splice(args: argparse.Namespace) -> int:
    from unsuperpose.analyze.splice_grid import SpliceError, splice_dictionaries, write_splice
    from unsuperpose.harvest import StoreError
    from unsuperpose.lm import CorpusError, ModelError

    # Its model and corpus are the ones the dictionary recorded, not flags: said as they are.
    with (
        copies() as names,  # a dictionary on S3 is read from a local copy
        names.messages(),
        stage_errors((ModelError, CorpusError, StoreError)),
        stage_errors(SpliceError, SPLICE_FLAGS),
    ):
        result = splice_dictionaries(
            names.read_copy(args.dict_path),
            corpus=args.corpus,
            tokens=args.tokens,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            device=getattr(args, "device", "cpu"),
            show=names.show,
        )
        out = splice_file(args.out, args.dict_path, warn=True)
        write_splice(out, result)
    text = result["text"]
    print(
        f"spliced into {result['model_dir']} at {result['hook']}, {result['tokens']:,} predicted "
        f"tokens ({'file ' + text['file'] if 'file' in text else 'the LM validation documents'}): "
        f"CE clean {result['ce_clean']:.4f}, zero-ablated {result['ce_zero']:.4f}, "
        f"mean-ablated {result['ce_mean']:.4f} nats"
    )
    for name, r in result["saes"].items():
        print(
            f"  {name}: CE {r['ce_sae']:.4f}, "
            f"delta {r['delta_ce']:+.4f} ± {r['delta_ce_se']:.4f} nats, "
            f"recovered {r['ce_loss_recovered']:.3f} "
            f"(vs mean ablation {r['ce_loss_recovered_mean']:.3f}), "
            f"KL {r['kl']:.4f}, |x_hat|/|x| {r['norm_ratio']:.3f}"
        )
    print(f"wrote {out}")
    return 0


def splice_file(out, dict_path, *, warn: bool = False):
    """Where the record goes: splice.json in the folder ``--out`` (default: the dictionary's
    folder), as every command's --out is the folder it writes. An --out naming a .json file, its
    old meaning, still names that file for one release, with a warning when ``warn``."""
    if out is None:
        return storage.location(dict_path) / "splice.json"
    if str(out).endswith(".json"):
        if warn:
            warnings.warn(
                f"--out {out}: a .json file is deprecated; --out is the folder splice.json is "
                "written into (the old meaning goes after the next release)",
                FlagDeprecation,
                stacklevel=2,
            )
        return out
    return out / "splice.json"  # (a local folder is made by write_json_atomic)


def _dict_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dictionary",
        dest="dict_path",
        type=storage.location,
        required=True,
        help="one dictionary folder (saes/<arch>-n<size>-<knob>_<value>) or a dictionary set "
        "(a folder with saes/); a folder or s3://...",
    )
    alias(p, "--dict", "--dictionary")  # --dict-sizes are sizes in train and toy


def _browser_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top", type=int, default=20, help="top-activating contexts per unit")
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="scan at most this many store rows (default: all)",
    )
    p.add_argument("--no-neurons", action="store_true", help="skip the MLP-neuron baseline page")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", help=distributed.DEVICE_HELP)
    ai = p.add_argument_group(
        "LLM-judged interpretability (optional; nothing is contacted without --autointerp-endpoint)"
    )
    ai.add_argument(
        "--autointerp-endpoint",
        default=None,
        metavar="URL",
        help="an OpenAI-compatible API's base URL (vLLM, llama.cpp, a hosted API), e.g. "
        "http://127.0.0.1:8000/v1: a chat model explains and scores units of every page",
    )
    ai.add_argument("--autointerp-model", default=None, metavar="NAME", help="the model to ask")
    ai.add_argument(
        "--autointerp-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (unset: no key is sent)",
    )
    ai.add_argument(
        "--autointerp-units", type=int, default=20, help="units judged per page (seeded draw)"
    )
    ai.add_argument(
        "--autointerp-explain", type=int, default=10, help="top excerpts an explanation is from"
    )
    ai.add_argument(
        "--autointerp-score",
        type=int,
        default=6,
        help="active excerpts (and as many silent ones) each explanation is scored on",
    )


def _browse_settings(args: argparse.Namespace):
    """The feature browser's settings, as --top, --max-rows, ... and --autointerp-* set them."""
    from unsuperpose.analyze.features import BrowseSettings

    return BrowseSettings(
        top=args.top,
        max_rows=args.max_rows,
        neurons=not args.no_neurons,
        progress=not args.no_progress,
        device=getattr(args, "device", "cpu"),
        endpoint=getattr(args, "autointerp_endpoint", None),
        model=getattr(args, "autointerp_model", None),
        key_env=args.autointerp_key_env,
        units=args.autointerp_units,
        explain=args.autointerp_explain,
        score=args.autointerp_score,
    )


def _noting_browser(args: argparse.Namespace):
    """The browser the report and the methods page build (or note why not), in flags' words."""
    from unsuperpose.analyze.features import noting_browser

    return noting_browser(_browse_settings(args), lambda message: in_flags(message, FLAGS))


def _report_command(args) -> str:
    """This report's command line, rebuilt from the parsed flags (also when the demo calls it)."""
    q = shlex.quote
    cmd = (
        f"unsuperpose analyze report --runs {q(str(args.runs))} --lm {q(args.lm)} "
        f"--layer {q(str(args.layer))}"
    )
    for flag, value in (("--toy", args.toy), ("--out", args.out), ("--max-rows", args.max_rows)):
        if value is not None:
            cmd += f" {flag} {q(str(value))}"
    if args.arch != DEFAULT_ARCH:
        cmd += f" --arch {args.arch}"
    if args.sets:
        cmd += f" --sets {q(','.join(args.sets))}"
    if args.dead_tolerance != DEFAULT_TOLERANCE:
        cmd += f" --dead-tolerance {args.dead_tolerance:g}"
    return cmd + ("" if args.features else " --no-features")


def run(args: argparse.Namespace) -> int:
    if args.analyze_command == "features":
        from unsuperpose.analyze.features import BROWSE_ERRORS, write_browser

        with stage_errors(BROWSE_ERRORS, {**FLAGS, "model": "--autointerp-model"}):
            pages, names = write_browser(
                args.dict_path, _browse_settings(args), out=args.out, store=args.store
            )
        print(f"feature browser: {names.show(pages['index'])} ({len(pages) - 1} pages)")
        return 0

    from unsuperpose.analyze.collect import GridError
    from unsuperpose.analyze.report import write_report

    if args.analyze_command == "methods":
        return _run_methods(args)
    with stage_errors(GridError, FLAGS):
        report, names = write_report(
            args.runs,
            args.lm,
            args.layer,
            out=args.out,
            toy=args.toy,
            tolerance=args.dead_tolerance,
            sets=args.sets,
            arch=args.arch,
            wandb_mode=args.wandb,
            browse=_noting_browser(args) if args.features else None,
            command=_report_command(args),
        )
    for note in report.notes:
        print(f"note: {in_flags(names.show(note), FLAGS)}")
    from unsuperpose.analyze.report_page import (
        below_evidence,
        estimate_text,
        sensitivity_text,
        window_text,
    )

    print(
        "estimate: "
        + estimate_text(
            report.lm.diagnosis.estimate(),
            report.lm.base,
            report.lm.name,
            report.lm.grid.knob_label,
        )
    )
    for p in report.lm.diagnosis.pointers:
        print(f"  {p.diagnostic}{' (default)' if p.default else ''}: {_pointed(p)}")
    print(calibration_text(report.lm.grid.arch))
    if window_text(report.lm.diagnosis):
        print(window_text(report.lm.diagnosis))
    if sensitivity_text(report.lm.diagnosis) and not below_evidence(report.lm.diagnosis):
        print(sensitivity_text(report.lm.diagnosis))
    print(f"report: {names.show(report.index)}")
    return 0


def _pointed(p) -> str:
    if not p.reading:
        return p.why
    if p.size is None:
        return "nowhere in the grid"
    return f"more than {p.size:,} latents" if p.lower_bound else f"{p.size:,} latents"


def _run_methods(args) -> int:
    from unsuperpose.analyze.collect import GridError
    from unsuperpose.analyze.methods import write_methods

    with stage_errors(GridError, FLAGS):
        report, names = write_methods(
            args.runs,
            args.lm,
            args.layer,
            args.out,
            target_l0=args.target_l0,
            browse=_noting_browser(args) if args.features else None,
        )
    for note in report.notes:
        print(f"note: {names.show(note)}")
    from unsuperpose.analyze.methods import fidelity_verdicts

    for line in fidelity_verdicts(report.points, report.d):
        print(line)
    for arch, c in report.concentration.items():
        if c.mean is not None:
            se = f" ± {c.se:.3f}" if c.se is not None else ""
            print(f"token concentration, {arch}: {c.mean:.3f}{se} over {c.scored} units")
    print(f"methods: {names.show(report.index)}")
    return 0
