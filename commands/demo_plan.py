"""The demo's plan: its budgets and its steps, each the command line of an ordinary subcommand
with the check that says its output is already complete.

The demo is, by design, the commands a user would type, so its plan is made of command lines
and lives with the commands; what a step's output must hold to be complete is asked of the stage
that writes it (``harvest.store.is_complete``, ``train.layout.is_complete``, the model's saved
``lm_config.json``), and whether the ReLU grid must grow of ``analyze.growth``.
``commands/demo.py`` runs the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unsuperpose.commands.train import dict_folder
from unsuperpose.errors import UserError
from unsuperpose.harvest.store import is_complete as store_complete
from unsuperpose.lm.model import saved_extra
from unsuperpose.train.layout import is_complete as grid_complete

__all__ = [
    "FULL",
    "LAYER",
    "LM",
    "QUICK",
    "QUICK_RUNS",
    "REAL",
    "REAL_FULL",
    "REAL_QUICK",
    "REAL_RUNS",
    "UPDATE",
    "Step",
    "plan",
    "sae_dir",
    "settings",
]

LM, LAYER = "tiny", 1

# The demo uses the same budgets as `make lm` (the tiny preset: 2.5M tokens) and `make toy` (its
# default grid, 5,000 steps), so its outputs are the ones those targets would make. Store: 2^19
# tokens of layer 1. SAEs: 1x..8x of d = 64 at four L1 values a half decade apart (on this layer,
# L1 1e-4 left ~40-80 latents active per token, 3e-3 about 7), 5,000 steps of 256. Measured on
# the 2-core machine: 10.8 minutes in all, quiet (docs/guides/demo.md).
FULL = dict(
    lm_tokens=2_500_000,
    layer=LAYER,
    store_tokens=524_288,
    dict="1x,2x,4x,8x",
    l1="3e-4,1e-3,3e-3,1e-2",
    sae_steps=5000,
    grow=["16x", "32x"],
    splice_tokens=8192,
    # `make toy`'s grid at its three middle L1 values (1/4x..4x, 5,000 steps): the whole
    # grid would take the demo past 20 minutes; this still brackets the truth (docs/results/toy.md).
    toy=["--l1", "0.0001,0.00031623,0.001"],
    toy_dir="toy-demo",
)
# --quick: a smoke run of a few minutes; the numbers mean little. Its own runs folder.
QUICK = dict(
    lm_tokens=65_536,
    layer=LAYER,
    store_tokens=131_072,
    dict="1x,2x,4x",
    l1="3e-4,1e-3,3e-3",
    sae_steps=400,
    grow=["8x"],
    splice_tokens=1024,
    toy=["--h", "64", "--g", "128", "--steps", "500", "--dict-sizes", "1/4x,1/2x,1x,2x,4x"],
    toy_dir="toy-demo",
)
QUICK_RUNS = Path("runs/quick")
# --lm smollm2 (`make real`): SmolLM2-135M-Instruct (30 layers, d_model 576, MLP 1,536 wide).
# Layer 2's mlp.hook_post (the input of down_proj, the hook the real-model guide studies).
# Zero-ablating each MLP on 1,020 validation tokens (clean CE 3.24 nats) cost: layer 0 +10.3 nats, 1
# +0.23, 2 +0.70, 3 +0.14, 5 +0.13, 8 +0.27, 12 +0.10, 15 +0.17, 20 +0.16. Layer 2 is the one whose
# ablation costs most short of layer 0 (an extended embedding, against which any dictionary
# "recovers" ~100%), so CE recovered discriminates there (the tiny LM's layer 3: +0.08). Early is
# also cheap: harvest runs the model only up to the layer (3 of 30 blocks). Blocks of 256 tokens
# (--n-ctx): the model's own context is 8,192, but the embedded Wikipedia leads are ~100 tokens
# each, so longer blocks only join unrelated documents at a quadratic price.
# The budget goes where the fast paths make it cheap: the TopK SAEs, whose CPU step is sparse
# after one dense encoder GEMM, train on one pass over the whole corpus; the ReLU grid the
# report's count reads stays the short grid it was.
REAL = dict(
    lm="smollm2",
    layer=2,
    n_ctx=256,
    # The whole embedded corpus: 1,058,304 tokens, 52,724 of them held out (the validation
    # documents, every held-out row read by the final metrics).
    store_tokens=None,
    # The report's ReLU grid: 0.5x..2x of d = 1,536 (768..3,072 latents) at three L1 values a
    # half decade apart, the fewest that MMCS with larger dictionaries, the dead boundary and
    # loss stickiness can read. 250 steps of 256: after them L1 1e-4 leaves 70-95 latents active
    # per token, 3e-4 8-22, 1e-3 1-7. Far from converged (the count says so); the TopK grid below
    # is the fidelity comparison.
    dict="0.5x,1x,2x",
    l1="1e-4,3e-4,1e-3",
    sae_steps=250,
    # TopK through its fast path: 4x (6,144 latents) at four k spanning the L0 the methods page
    # compares (16..128). 982 steps of 1,024 = one pass over the store's 1,005,580 training rows:
    # every batch is new to the SAEs when its loss is logged, so the training log is a held-out
    # curve, and the embedded corpus is all there is (a second pass only repeats rows). Batch
    # 1,024: a step's samples/s measured the same at 1,024 and 4,096, so the smaller batch gives
    # 4x the steps. Cost: the four encoder GEMMs (75.5 MFLOP a row) are most of a step; 466
    # samples/s (2.2 s a step, 45.8 min with the splice-in) at load 2.2, longer than the 30 minutes
    # asked of it, but the held-out curve is flat by then (docs/results/smollm2.md).
    topk=dict(dict="4x", k="16,32,64,128", steps=982, batch=1024),
    # Every spliced dictionary costs a full 30-layer forward (~400 tokens/s on 2 quiet cores),
    # plus 3 per set for clean, zero and mean ablation: 35 forwards of 4,352 tokens (whole
    # blocks). 4,096 rather than 1,024: delta CE's standard error halves (~0.015 nats at 1,024),
    # to below the gaps between methods it is read on.
    splice_tokens=4096,
    # the neuron basis and PCA at the TopK grid's L0 (k active of 1,536), and with every
    # coefficient; fitted on one pass over the store's training rows (batches of 1,024)
    baseline_topk="16,32,64,128,all",
    baseline_steps=982,
    grow=[],
)
# --lm smollm2 --quick: a smoke run of a few minutes; the numbers mean little.
REAL_QUICK = dict(
    REAL,
    store_tokens=16_384,
    dict="0.25x,0.5x",
    sae_steps=50,
    topk=dict(dict="0.5x", k="16,32,64,128", steps=50, batch=256),
    splice_tokens=256,
    baseline_steps=50,
)
# --lm smollm2 --full: a GPU job (`make real ARGS=--full`; train and harvest pick the GPU when
# one is visible). 1x..16x of d (1,536..24,576 latents) at five L1 values, 10,000 steps of 256
# (~2.5 passes over the training rows, as in --update), TopK at 4x and 16x for 10,000 steps of
# 1,024 (~10 passes: the embedded corpus is all there is), the spliced-in evaluation on 16,384
# tokens (delta CE's standard error ~1e-3 nats), and the ReLU grid grown to 32x where the
# largest dictionary keeps its latents. On the 2-core CPU it would take days (~35 s a step for
# the ReLU grid's ~240,000 latents, 10,000 steps).
REAL_FULL = dict(
    REAL,
    dict="1x,2x,4x,8x,16x",
    # a decade lower than the CPU grid's top too: longer training leaves fewer latents active
    l1="3e-5,1e-4,3e-4,1e-3,3e-3",
    sae_steps=10_000,
    topk=dict(dict="4x,16x", k="16,32,64,128", steps=10_000, batch=1024),
    splice_tokens=16_384,
    grow=["32x"],
)
REAL_RUNS = {"quick": QUICK_RUNS, "full": Path("runs/full")}
# --update: the follow-up update's experiment (`make replicate-update`): the same tiny LM, its
# layer-3 MLP (64 wide) over the whole corpus, dictionaries 1x..32x (64..2,048 latents) at four
# L1 values, 10,000 steps; `make toy`'s full grid beside it. 16.3 minutes with the LM trained
# (docs/results/update.md).
UPDATE = dict(
    lm_tokens=2_500_000,
    layer=3,
    store_tokens=None,
    dict="1x,2x,4x,8x,16x,32x",
    l1="3.1623e-4,1e-3,3.1623e-3,1e-2",
    sae_steps=10_000,
    grow=[],
    toy=[],
    toy_dir="toy",
    splice_tokens=16_384,
)


@dataclass
class Step:
    name: str
    argv: list[str]
    done: Callable[[], bool]
    output: Path
    grow: bool = False  # a larger dictionary, run only while some L1 keeps every latent alive


def lm_done(lm_dir: Path, tokens: int) -> bool:
    """A model trained on this demo's budget is done; one trained on another is refused (it
    would be passed off as this demo's: e.g. the --quick LM in the full demo's folder)."""
    extra = saved_extra(lm_dir)
    if extra is None:
        return False
    have = (extra.get("train") or {}).get("tokens")
    if have is not None and int(have) != tokens:
        raise UserError(
            f"{lm_dir} holds an LM trained on {int(have):,} tokens, not the {tokens:,} of "
            "this demo; use another --runs, or delete that folder to train it again"
        )
    return True


def adopted(lm_dir: Path, source: str) -> bool:
    """An LM adopted from ``source`` is done; another model in its folder is refused."""
    extra = saved_extra(lm_dir)
    if extra is None:
        return False
    have = extra.get("adopted_from")
    if have != source:
        raise UserError(
            f"{lm_dir} holds another model ({have or 'not adopted'}), not {source}; use "
            "another --runs, or delete that folder to adopt it again"
        )
    return True


def settings(quick: bool = False, update: bool = False, lm: str = LM, full: bool = False) -> dict:
    if lm != LM:
        return REAL_FULL if full else REAL_QUICK if quick else REAL
    return UPDATE if update else QUICK if quick else FULL


def sae_dir(runs: Path, s: dict) -> Path:
    return runs / "sae" / s.get("lm", LM) / f"layer{s['layer']}"


def _train_step_maker(store: Path, sae_out: Path, s: dict, quiet: list[str]):
    """``train_step(title, spec, knob, grow=False, steps=None, batch=None)``: the Step that
    trains (or fits) one set of sizes into ``sae_out``; ``knob`` is the method's flags
    (``--l1 ...``, or ``--arch pca --topk ...``), ``steps`` and ``batch`` its budget (default:
    the settings' ``sae_steps`` of the default batch)."""
    # The same splice for every method, so every set is scored on the same tokens.
    splice = ["--splice-tokens", str(s["splice_tokens"])]

    def train_step(
        title: str,
        spec: str,
        knob: list[str],
        grow: bool = False,
        steps: int | None = None,
        batch: int | None = None,
    ) -> Step:
        arch = knob[1] if knob[0] == "--arch" else "relu"
        folder = sae_out / dict_folder(spec, arch)
        argv = ["train", "--store", str(store), "--dict-sizes", spec, "--out", str(sae_out)]
        budget = ["--steps", str(steps or s["sae_steps"])]
        budget += ["--batch-size", str(batch)] if batch else []
        return Step(
            title,
            [*argv, *knob, *budget, *splice, *quiet],
            lambda: grid_complete(folder),
            folder,
            grow=grow,
        )

    return train_step


def plan(
    runs: Path,
    quick: bool = False,
    progress: bool = True,
    update: bool = False,
    lm: str = LM,
    full: bool = False,
) -> list[Step]:
    """The demo's steps, in order, each with its command line and its completeness check."""
    s = settings(quick, update, lm, full)
    if lm != LM:
        return plan_real(runs, s, [] if progress else ["--no-progress"])
    layer = s["layer"]
    lm_dir = runs / "lm" / LM
    acts = runs / "acts" / LM
    store = acts / f"layer{layer}.zarr"
    sae_out = runs / "sae" / LM / f"layer{layer}"
    # The demo's toy grid is smaller than `make toy`'s (runs/toy), and a folder holds one grid.
    toy = runs / s["toy_dir"]
    quiet = [] if progress else ["--no-progress"]
    tokens = ["--tokens", str(s["store_tokens"])] if s["store_tokens"] else []
    train_step = _train_step_maker(store, sae_out, s, quiet)
    relu = ["--l1", s["l1"]]

    return [
        Step(
            "tiny LM",
            [
                "lm",
                "train",
                "--preset",
                LM,
                "--out",
                str(lm_dir),
                "--tokens",
                str(s["lm_tokens"]),
                *quiet,
            ],
            lambda: lm_done(lm_dir, s["lm_tokens"]),
            lm_dir,
        ),
        Step(
            f"harvest layer {layer}",
            [
                "harvest",
                "--lm",
                str(lm_dir),
                "--layer",
                str(layer),
                "--out",
                str(acts),
                *tokens,
                *quiet,
            ],
            lambda: store_complete(store),
            store,
        ),
        train_step("SAE grid", s["dict"], relu),
        *[train_step(f"SAE grid, grown to {size}", size, relu, grow=True) for size in s["grow"]],
        Step(
            "toy replication",
            ["toy", "--out", str(toy), *s["toy"], *quiet],
            lambda: grid_complete(toy),
            toy,
        ),
        # Always rebuilt: it is cheap, and it must reflect whatever the steps above left.
        Step(
            "report",
            [
                "analyze",
                "report",
                "--runs",
                str(runs),
                "--lm",
                LM,
                "--layer",
                str(layer),
                "--toy",
                str(toy),
                *quiet,
            ],
            lambda: False,
            runs / "report" / f"{LM}-layer{layer}" / "index.html",
        ),
    ]


def plan_real(runs: Path, s: dict, quiet: list[str]) -> list[Step]:
    """``--lm smollm2``: adopt -> harvest -> ReLU grid -> TopK grid -> neuron basis and PCA ->
    report -> the methods page. Every set is spliced into the model as it is trained (train's
    --splice-tokens), so the report and the methods page read CE, KL and delta CE from them."""
    name, layer = s["lm"], s["layer"]
    lm_dir = runs / "lm" / name
    acts = runs / "acts" / name
    store = acts / f"layer{layer}.zarr"
    sae_out = sae_dir(runs, s)
    tokens = ["--tokens", str(s["store_tokens"])] if s["store_tokens"] else []
    train_step = _train_step_maker(store, sae_out, s, quiet)
    relu = ["--l1", s["l1"]]
    topk = s["topk"]
    report = runs / "report" / f"{name}-layer{layer}"
    where = ["--runs", str(runs), "--lm", name, "--layer", str(layer)]
    return [
        Step(
            f"adopt {name}",
            ["lm", "adopt", "--from", name, "--out", str(lm_dir)],
            lambda: adopted(lm_dir, name),
            lm_dir,
        ),
        Step(
            f"harvest layer {layer}",
            [
                "harvest",
                "--lm",
                str(lm_dir),
                "--layer",
                str(layer),
                "--n-ctx",
                str(s["n_ctx"]),
                "--out",
                str(acts),
                *tokens,
                *quiet,
            ],
            lambda: store_complete(store),
            store,
        ),
        train_step("SAE grid", s["dict"], relu),
        *[train_step(f"SAE grid, grown to {size}", size, relu, grow=True) for size in s["grow"]],
        train_step(
            "TopK SAEs",
            topk["dict"],
            ["--arch", "topk", "--topk", topk["k"]],
            steps=topk["steps"],
            batch=topk["batch"],
        ),
        *[
            train_step(
                title,
                "1x",
                ["--arch", arch, "--topk", s["baseline_topk"]],
                steps=s["baseline_steps"],
                batch=topk["batch"],
            )
            for title, arch in (("neuron basis", "neurons"), ("PCA", "pca"))
        ],
        # Both always rebuilt: they are cheap beside the rest, and must reflect what is there.
        # The report's toy comparison is `make toy`'s grid (RUNS/toy) when there is one.
        Step("report", ["analyze", "report", *where, *quiet], lambda: False, report / "index.html"),
        Step(
            "methods",
            ["analyze", "methods", *where, *quiet],
            lambda: False,
            report.with_name(report.name + "-methods") / "index.html",
        ),
    ]
