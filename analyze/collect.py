"""Read the dictionary sets a grid run left on disk (see ``unsuperpose.train.io``) and merge them.

A *dictionary set* is one ``unsuperpose toy`` / ``unsuperpose train`` output folder: ``saes/``
with one ``n<size>-l1_<l1>/`` per SAE, beside ``summary.csv``. The LM report reads every set
trained for one store (``runs/sae/<LM>/layer<L>/*/``) and merges them into one grid keyed by
(L1 coefficient, dictionary size).

Each SAE is read from its own ``config.json`` rather than from ``summary.csv``: the config holds
the L1 coefficient under ``l1`` unambiguously, while a summary row also carries the codes' mean
L1 norm, which train/io.py writes under the same column name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from unsuperpose.train.config import option_groups
from unsuperpose.train.io import read_latent_stats, sparsity_of
from unsuperpose.train.layout import (
    DICT_CONFIG_FILE,
    DICT_WEIGHTS_FILE,
    SAES_DIR,
    dictionary_dirs,
    holds_dictionaries,
)
from unsuperpose.train.registry import DEFAULT_ARCH, get_family


class GridError(ValueError):
    """Dictionary sets that cannot be read as one grid: none found, other settings or widths,
    a set or an architecture that is not there."""


Key = tuple[float, int]  # (the knob's value, the dictionary size)
SAES = SAES_DIR


@dataclass
class Cell:
    """One trained SAE: its grid position (its knob's value and size), final metrics and where
    it lies."""

    knob: float
    n: int
    d_in: int
    metrics: dict
    sae_dir: Path
    set_dir: Path
    steps: int
    samples: int
    mtime: float
    identity: dict = field(default_factory=dict)

    arch: str = DEFAULT_ARCH

    @property
    def key(self) -> Key:
        return (self.knob, self.n)

    @property
    def l1(self) -> float:
        """The knob's value under the name it had when the knob was always L1 (deprecated)."""
        return self.knob

    def latent_stats(self) -> dict[str, torch.Tensor] | None:
        """Per latent: held-out fires and training steps since it last fired (None: a run made
        before they were saved)."""
        return read_latent_stats(self.sae_dir)


@dataclass
class Grid:
    """The merged grid of one store (or of the toy run) and what was merged to make it."""

    cells: dict[Key, Cell]
    sets: list[Path]
    source: dict
    d: int
    notes: list[str] = field(default_factory=list)

    @property
    def arch(self) -> str:
        """The one architecture of the grid (sets of two are never merged)."""
        return next(iter(self.cells.values())).arch if self.cells else DEFAULT_ARCH

    @property
    def knob_label(self) -> str:
        """How the grid's sparsity knob is written ("L1", "k", "L0 coefficient")."""
        return get_family(self.arch).knob.label

    @property
    def dead_window(self) -> int | None:
        """The training window (batches) behind the ``dead`` column; one per grid (merges of
        different windows are refused)."""
        windows = {c.identity.get("dead_window") for c in self.cells.values()}
        return windows.pop() if len(windows) == 1 else None

    def rows(self) -> list[dict]:
        """One flat row per SAE: the saved metrics, with the coefficient and size as keys."""
        out = []
        for key in sorted(self.cells):
            c = self.cells[key]
            # The knob's value as "sparsity", and as "l1", the column these rows have always had
            # (lm_grid.csv). The saved metrics' "l1" is the codes' L1 norm; keep it under a name
            # that says so.
            row = {"l1": c.knob, "dict_size": c.n, "arch": c.arch, "sparsity": c.knob}
            row.update((k, v) for k, v in c.metrics.items() if k not in row)
            if "l1" in c.metrics and c.metrics["l1"] != c.knob:
                row["l1_codes"] = c.metrics["l1"]
            row.update(steps=c.steps, samples=c.samples, set=c.set_dir.name)
            out.append(row)
        return out

    def values(self, column: str) -> dict[Key, float]:
        """{(knob, n): value} of one metric, for the cells that have a finite one."""
        out = {}
        for row in self.rows():
            v = row.get(column)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[(row["sparsity"], row["dict_size"])] = float(v)
        return out

    def dictionaries(self) -> dict[Key, torch.Tensor]:
        """The unit-norm atoms (n, d) of every SAE, read from its safetensors file."""
        return {
            k: load_file(str(c.sae_dir / DICT_WEIGHTS_FILE))["W_dec"] for k, c in self.cells.items()
        }


def is_set(path: Path) -> bool:
    return holds_dictionaries(path)


def set_arch(path: Path) -> str:
    """The architecture of a dictionary set (its first dictionary's tag; untagged: relu)."""
    first = dictionary_dirs(path)[0]
    return json.loads((first / DICT_CONFIG_FILE).read_text()).get("arch", DEFAULT_ARCH)


def read_set(set_dir: str | Path) -> dict[Key, Cell]:
    """Every SAE of one dictionary set, from the config.json beside each one's weights (an SAE
    still being written, without its weights file, is not read)."""
    set_dir = Path(set_dir)
    cells = {}
    for sae_dir in dictionary_dirs(set_dir):
        cfg_path = sae_dir / DICT_CONFIG_FILE
        cfg = json.loads(cfg_path.read_text())
        metrics = dict(cfg.get("metrics") or {})
        training = cfg.get("training") or {}
        steps = int(metrics.get("steps", training.get("steps", 0)))
        samples = int(metrics.get("samples", steps * int(training.get("batch_size", 1))))
        cell = Cell(
            knob=float(sparsity_of(cfg)),
            n=int(cfg["d_sae"]),
            d_in=int(cfg["d_in"]),
            metrics=metrics,
            sae_dir=cfg_path.parent,
            set_dir=set_dir,
            steps=steps,
            samples=samples,
            mtime=cfg_path.stat().st_mtime,
            identity=merge_identity(cfg),
            arch=cfg.get("arch", DEFAULT_ARCH),
        )
        cells[cell.key] = cell
    return cells


# What must agree for two dictionary sets to be one grid. Every diagnostic is read relative to
# the rest of the grid, so a cell trained longer, with another learning rate, batch, resampling,
# encoder/decoder or L1 convention, or read with another dead window, is not comparable with its
# neighbours; the data must be the same (the store's fingerprint covers model weights, corpus,
# hook, layer and rows). The L1 values, sizes and seeds are what a grid varies.
_TRAINING_IDENTITY = (
    "steps",
    "batch_size",
    "lr",
    "beta1",
    "beta2",
    "l1_norm",
    "tied",
    "decoder_init",
    "encoder_init",
    "resample_every",
    "dead_window",
)
_RESAMPLING_IDENTITY = ("resample_pool", "resample_until")  # only matter when resampling
_SOURCE_IDENTITY = ("fingerprint", "weights_sha256", "corpus_fingerprint", "hook", "layer", "rows")


def merge_identity(cfg: dict) -> dict:
    training = cfg.get("training") or {}
    source = cfg.get("source") or {}
    arch = cfg.get("arch", DEFAULT_ARCH)
    ident = {"arch": arch}
    ident.update((k, training.get(k)) for k in _TRAINING_IDENTITY)
    for group in option_groups(arch):  # the architecture's own options (AuxK, ...)
        ident[group] = json.dumps(training.get(group), sort_keys=True)  # hashable, comparable
    ident["l1_norm"] = cfg.get("l1_norm", training.get("l1_norm"))
    if training.get("resample_every"):
        ident.update((k, training.get(k)) for k in _RESAMPLING_IDENTITY)
    ident.update((f"source.{k}", source.get(k)) for k in _SOURCE_IDENTITY)
    return ident


def _shown(v) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{v}"


def check_mergeable(sets: list[dict[Key, Cell]]) -> None:
    """One GridError naming each set and each difference ("steps: 300 vs 1,500"), when the sets
    are not one experiment. Nothing is pooled across a difference."""
    by_set = {}
    for cells in sets:
        for c in cells.values():
            if by_set.setdefault(c.set_dir, c.identity) != c.identity:
                raise GridError(
                    f"{c.set_dir} holds SAEs trained with different settings: it is "
                    "not one grid; retrain it"
                )
    if len({tuple(sorted(i.items(), key=str)) for i in by_set.values()}) <= 1:
        return
    first_dir, first = next(iter(by_set.items()))
    lines = []
    for d, ident in by_set.items():
        keys = sorted(set(first) | set(ident))
        diff = [
            f"{k}: {_shown(first.get(k))} vs {_shown(ident.get(k))}"
            for k in keys
            if first.get(k) != ident.get(k)
        ]
        if diff:
            lines.append(f"{first_dir.name} vs {d.name}: {'; '.join(diff)}")
    raise GridError(
        "these dictionary sets are not one grid, and the diagnostics compare every "
        "cell with its neighbours: " + " | ".join(lines) + ". Read one experiment at a "
        f"time: name its sets, e.g. sets={first_dir.name!r}, move "
        "the others out of the folder, or retrain them with the same settings"
    )


def merge_sets(sets: list[dict[Key, Cell]]) -> tuple[dict[Key, Cell], list[str]]:
    """One cell per (L1, size): where two sets hold the same one, the longer-trained (then the
    more recent) wins, and a note says which."""
    merged: dict[Key, Cell] = {}
    notes = []
    for cells in sets:
        for key, cell in cells.items():
            old = merged.get(key)
            if old is None:
                merged[key] = cell
                continue
            new_wins = (cell.samples, cell.mtime) > (old.samples, old.mtime)
            win, lose = (cell, old) if new_wins else (old, cell)
            merged[key] = win
            notes.append(
                f"L1 {key[0]:g} x {key[1]} latents is in both {lose.set_dir.name} and "
                f"{win.set_dir.name}: using {win.set_dir.name} ({win.steps:,} steps, "
                f"{win.samples:,} samples; the other {lose.steps:,} steps, {lose.samples:,})"
            )
    return merged, notes


def _grid(set_dirs: list[Path], what: str, fix: str) -> Grid:
    if not set_dirs:
        raise GridError(f"no dictionaries found for {what}; {fix}")
    sets = [read_set(p) for p in set_dirs]
    check_mergeable(sets)
    cells, notes = merge_sets(sets)
    widths = {c.d_in for c in cells.values()}
    if len(widths) != 1:
        by = {w: sorted({c.set_dir.name for c in cells.values() if c.d_in == w}) for w in widths}
        raise GridError(
            f"the dictionaries for {what} have different input widths {by}: they were "
            "trained on different stores; move the stray set out of the folder"
        )
    first = next(iter(cells.values()))
    source = json.loads((first.sae_dir / "config.json").read_text()).get("source") or {}
    return Grid(cells=cells, sets=list(set_dirs), source=source, d=widths.pop(), notes=notes)


def lm_sets_dir(runs: str | Path, lm: str, layer: int | str) -> Path:
    return Path(runs) / "sae" / lm / f"layer{layer}"


def collect_lm(
    runs: str | Path,
    lm: str,
    layer: int | str,
    sets: list[str] | None = None,
    arch: str = DEFAULT_ARCH,
) -> Grid:
    """Every dictionary set trained on ``<runs>/acts/<lm>/layer<L>.zarr`` (or only the ``sets``
    named), merged into one grid.

    Sets are merged oldest first, so that the later of two equally long runs wins a tie.
    """
    base = lm_sets_dir(runs, lm, layer)
    found = [p for p in sorted(base.iterdir()) if p.is_dir() and is_set(p)] if base.is_dir() else []
    if is_set(base):
        found.append(base)
    if sets:
        names = {p.name: p for p in found}
        missing = [s for s in sets if s not in names]
        if missing:
            raise GridError(
                f"no dictionary set named {', '.join(missing)} under {base}; the sets "
                f"there are: {', '.join(sorted(names)) or 'none'}"
            )
        found = [names[s] for s in sets]
    if not sets and found:
        # Without named sets, the grid is the sets of one architecture: a folder holding relu and
        # topk grids side by side is not one grid, and neither is refused for the other.
        archs = {p: set_arch(p) for p in found}
        if arch not in archs.values():
            raise GridError(
                f"no {arch} dictionary set under {base}; the sets there are: "
                + ", ".join(f"{p.name} ({a})" for p, a in archs.items())
                + f". Choose one architecture, e.g. arch={next(iter(archs.values()))!r}"
            )
        found = [p for p in found if archs[p] == arch]
    found.sort(key=lambda p: max(c.stat().st_mtime for c in (p / SAES).glob("*/config.json")))
    grid = _grid(
        found,
        f"LM {lm!r} layer {layer} (looked in {base}/*/saes/)",
        f"train a grid first, e.g. `make train LM={lm} LAYER={layer} DICT=1x,2x,4x,8x`",
    )
    # A set still training has a checkpoint but no dictionaries yet: say so rather than skip it
    # silently.
    unfinished = [
        p.name for p in sorted(base.iterdir()) if (p / "checkpoint").is_dir() and not is_set(p)
    ]
    if unfinished:
        grid.notes.append(
            f"not included, still training (rerun its `unsuperpose train` command to "
            f"finish it): {', '.join(unfinished)}"
        )
    return grid


def collect_toy(path: str | Path) -> Grid:
    """The toy run's grid (one set, with ground-truth columns mmcs/mcc)."""
    path = Path(path)
    return _grid(
        [path] if is_set(path) else [],
        f"the toy run (looked in {path}/saes/)",
        "run the toy replication into it first (`make toy`, or `unsuperpose toy`), "
        "or read another one, toy=PATH",
    )
