"""The feature browser end to end: dictionaries + their store -> one HTML page per dictionary,
plus the MLP neurons as the baseline, from one pass over the store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from unsuperpose import distributed, storage
from unsuperpose.analyze.autointerp import AutointerpError, AutointerpSettings, run_autointerp
from unsuperpose.analyze.browser import BrowserError, contexts, firing_summary, scan, token_arrays
from unsuperpose.analyze.browser_page import render, write_index
from unsuperpose.analyze.endpoint import EndpointError
from unsuperpose.analyze.html import write
from unsuperpose.analyze.monosemantic import summary as concentration_summary
from unsuperpose.analyze.remote import Names, copies
from unsuperpose.config import write_json_atomic
from unsuperpose.harvest import ActivationStore, StoreError, store_decoder
from unsuperpose.lm import ModelError
from unsuperpose.train import SAE, load_dictionary
from unsuperpose.train.layout import DICT_WEIGHTS_FILE, dictionary_dirs
from unsuperpose.train.registry import DEFAULT_ARCH

NEURONS = "neurons"


def find_saes(path: str | Path) -> list[Path]:
    """One SAE folder, or every SAE of a dictionary set (a folder with saes/)."""
    path = Path(path)
    if (path / DICT_WEIGHTS_FILE).exists():
        return [path]
    found = dictionary_dirs(path)
    if not found:
        raise FileNotFoundError(
            f"{path} holds no dictionary: give one dictionary folder "
            f"(.../saes/<arch>-n<size>-<knob>_<value>, with {DICT_WEIGHTS_FILE}) or a "
            "dictionary set (a folder with saes/)"
        )
    return found


def store_of(sae: SAE) -> str | None:
    """The store an SAE was trained on, as its config.json recorded it (None for toy data)."""
    src = sae.config.get("source") or {}
    return src.get("path") if src.get("kind") == "activation_store" else None


def build_browser(
    sae_dirs: list[Path],
    store,
    out: str | Path,
    decode: Callable[[list[int]], str],
    *,
    top: int = 20,
    max_rows: int | None = None,
    neurons: bool = True,
    left: int = 10,
    right: int = 4,
    progress: bool = True,
    device: torch.device | str = "cpu",
    autointerp: AutointerpSettings | None = None,
) -> dict[str, Path]:
    """Write ``out/<sae folder>.html`` per dictionary, ``out/neurons.html`` and ``out/index.html``.

    ``store`` is an ``ActivationStore`` (``.path``, ``.d``, ``.rows``, ``.read_rows``,
    ``.metadata``); ``decode`` turns a list of token ids into their text. ``autointerp``: also
    have a chat model explain and score units of every page (``analyze.autointerp``), written
    to ``out/autointerp/`` and shown on the pages; nothing is contacted without it.
    """
    out = Path(out)
    token_arrays(store.path)  # fail before the long pass if there is no text to show
    saes, dirs = {}, {}
    for d in sae_dirs:
        sae = load_dictionary(d)
        if sae.d_in != store.d:
            trained_on = store_of(sae)
            where = repr(trained_on) if trained_on else "PATH (its config.json names none)"
            raise BrowserError(
                f"{d} reads activations of width {sae.d_in} but {store.path} has width "
                f"{store.d}: read the store it was trained on, store={where}"
            )
        saes[d.name], dirs[d.name] = sae.eval().to(device), d
    encoders = {name: sae.encode for name, sae in saes.items()}
    if neurons:
        encoders[NEURONS] = lambda x: x
    stats = scan(store, encoders, top=top, max_rows=max_rows, progress=progress, device=device)
    ctxs = contexts(stats, store.path, left=left, right=right)
    judged = None
    if autointerp is not None:
        judged = run_autointerp(
            store,
            encoders,
            stats,
            decode,
            out / "autointerp",
            autointerp,
            device=device,
            progress=progress,
        )
    notes = {name: d["judged"] for name, d in judged["dictionaries"].items()} if judged else {}
    meta = store.metadata
    common = {
        "store": str(store.path),
        "model": meta.get("model_dir", "?"),
        "hook": meta.get("hook", "?"),
        "rows scanned": f"{stats[next(iter(stats))].rows:,} of {store.rows:,}",
    }
    pages = {}
    for name, sae in saes.items():
        info = {
            **common,
            "dictionary": str(dirs[name]),
            "latents": sae.d_sae,
            "architecture": sae.config.get("arch", DEFAULT_ARCH),
            "sparsity knob": f"{sae.config.get('sparsity_name', 'l1')} "
            f"{sae.config.get('sparsity', sae.config.get('l1', '?'))}",
        }
        pages[name] = write(
            out / f"{name}.html",
            render(
                f"Latents of {name}",
                "latent",
                stats[name],
                ctxs[name],
                decode,
                info,
                notes.get(name),
            ),
        )
    if neurons:
        pages[NEURONS] = write(
            out / f"{NEURONS}.html",
            render(
                "MLP neurons (baseline)",
                "neuron",
                stats[NEURONS],
                ctxs[NEURONS],
                decode,
                {**common, "neurons": store.d},
                notes.get(NEURONS),
            ),
        )
    mono = {name: concentration_summary(c, top) for name, c in ctxs.items()}
    pages["index"] = write_index(out, dict(pages), common, mono, judged)
    write_json_atomic(out / "monosemanticity.json", mono)
    summaries = {
        name: {**firing_summary(s), "token_concentration_median": mono[name].get("token_median")}
        for name, s in stats.items()
    }
    write(out / "summary.txt", "".join(f"{k}: {v}\n" for k, v in summaries.items()))
    return pages


# What ``browse`` raises when no browser can be built (the command names them in one line).
BROWSE_ERRORS = (BrowserError, StoreError, ModelError, EndpointError, AutointerpError)


@dataclass(frozen=True)
class BrowseSettings:
    """How ``browse`` builds a feature browser: ``build_browser``'s settings, the device by name
    (``distributed.resolve_device``) and the LLM judge's (``endpoint`` None: none is asked)."""

    top: int = 20
    max_rows: int | None = None
    neurons: bool = True
    progress: bool = True
    device: str = "cpu"
    endpoint: str | None = None
    model: str | None = None
    key_env: str = "OPENAI_API_KEY"
    units: int = 20
    explain: int = 10
    score: int = 6

    def autointerp(self) -> AutointerpSettings | None:
        """The judge's settings, or None when no endpoint is named; a ``BrowserError`` when
        only one of the endpoint and the model is."""
        if self.endpoint is None:
            if self.model is not None:
                raise BrowserError(f"model={self.model!r} needs endpoint=URL: the server to ask")
            return None
        if self.model is None:
            raise BrowserError(
                f"endpoint={self.endpoint!r} needs model=NAME: the model the server should use"
            )
        return AutointerpSettings(
            endpoint=self.endpoint,
            model=self.model,
            key_env=self.key_env,
            units=self.units,
            explain=self.explain,
            score=self.score,
        )


def open_store(path: str | Path) -> ActivationStore:
    """The activation store at ``path`` (a folder or s3://...); a ``BrowserError`` if none."""
    path = storage.location(path)
    if not storage.exists(path):
        raise BrowserError(
            f"activation store {path} does not exist; pass the store the dictionary was "
            "trained on as store=PATH, or harvest it (`make harvest`)"
        )
    return ActivationStore(path)


def browse(
    sae_dirs: list[Path],
    out: str | Path,
    settings: BrowseSettings,
    store: str | Path | None = None,
) -> dict[str, Path]:
    """The feature browser of ``sae_dirs`` in ``out`` (``build_browser``), read from ``store``
    (default: the one the first dictionary was trained on); one of ``BROWSE_ERRORS`` says why
    there is none."""
    if store is None:
        recorded = store_of(load_dictionary(sae_dirs[0]))
        if recorded is None:
            raise BrowserError(
                f"{sae_dirs[0]} was not trained on an activation store (toy data has no "
                "tokens to show); pass one as store=PATH"
            )
        store = storage.location(recorded)
    if settings.top < 1:
        raise BrowserError(f"top={settings.top} must be at least 1")
    autointerp = settings.autointerp()
    if autointerp is not None:
        autointerp.check()
    opened = open_store(store)
    return build_browser(
        sae_dirs,
        opened,
        out,
        store_decoder(opened),
        top=settings.top,
        max_rows=settings.max_rows,
        neurons=settings.neurons,
        progress=settings.progress,
        device=distributed.resolve_device(settings.device),
        autointerp=autointerp,
    )


def write_browser(
    dictionary: storage.Location,
    settings: BrowseSettings,
    *,
    out: storage.Location | None = None,
    store: storage.Location | None = None,
) -> tuple[dict[str, Path], Names]:
    """``browse`` of one dictionary or a dictionary set (``find_saes``) into ``out`` (default
    DICTIONARY/features), either of them a folder or on object storage: the browser's folder is
    locked as its writer's (the dictionaries and stores read are not), a dictionary on S3 read
    from a local copy, a browser for S3 written in one and copied up. Returns the pages and the
    ``Names`` that show their URLs; a folder without a dictionary is a ``BrowserError``."""
    out = out or dictionary / "features"
    with copies() as names:
        with names.messages():
            try:
                saes = find_saes(names.read_copy(dictionary))
            except FileNotFoundError as exc:
                raise BrowserError(str(exc)) from None
        with names.writing(out, f"the feature browser {out}") as local:
            pages = browse(saes, local, settings, store=store)
    return pages, names


def noting_browser(
    settings: BrowseSettings, words: Callable[[str], str] = str
) -> Callable[[Path | list[Path], Path], dict[str, Path]]:
    """``browse`` for ``build_report`` (one dictionary) and ``build_methods`` (a list): any of
    ``BROWSE_ERRORS`` becomes a ``BrowserError`` in ``words`` (e.g. the command's flags), which
    the page notes before going on without a browser."""

    def browser(sae_dirs: Path | list[Path], out: Path) -> dict[str, Path]:
        dirs = list(sae_dirs) if isinstance(sae_dirs, list) else [sae_dirs]
        try:
            return browse(dirs, out, settings)
        except BROWSE_ERRORS as exc:
            raise BrowserError(words(str(exc))) from None

    return browser
