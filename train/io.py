"""What a trained grid leaves on disk, and reading it back (names: ``train.layout``).

summary.csv has one row per dictionary: arch, sparsity_name, sparsity, dict_size, steps, samples,
the final metrics and extras; relu rows also keep the ``l1`` column runs have always had.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save as safetensors_bytes

from unsuperpose.config import (
    from_dict,
    to_dict,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from unsuperpose.train.config import SAETrainConfig
from unsuperpose.train.dictionary import load_dictionary
from unsuperpose.train.layout import (
    CONFIG_FILE,
    HISTORY_FILE,
    LATENTS_FILE,
    SAES_DIR,
    SOURCE_FILE,
    SUMMARY_FILE,
    dict_dirname,
    dictionary_dirs,
)
from unsuperpose.train.registry import DEFAULT_ARCH

# Provenance that may differ between two reads of the same data (where it lies, how it is read).
_NOT_IDENTITY = {"path"}
# How a run was made, beside its settings in train_config.json: not part of what it computes
# (a grid split over ranks is bit-identical to one process), so never compared on resume.
RUN_KEYS = ("device", "device_name", "world_size", "parallel", "sizes_by_rank")


def write_train_config(out: str | Path, cfg: SAETrainConfig, run_info: dict | None = None) -> None:
    write_json_atomic(Path(out) / CONFIG_FILE, {**to_dict(cfg), **(run_info or {})})


def read_train_config(out: str | Path) -> tuple[SAETrainConfig, dict]:
    """(settings, how the run was made) from a grid folder's train_config.json."""
    data = json.loads((Path(out) / CONFIG_FILE).read_text())
    run_info = {k: data.pop(k) for k in RUN_KEYS if k in data}
    return from_dict(SAETrainConfig, data), run_info


def write_source_file(out: str | Path, info: dict) -> None:
    write_json_atomic(Path(out) / SOURCE_FILE, info)


def read_source_file(out: str | Path) -> dict | None:
    path = Path(out) / SOURCE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def source_differences(have: dict, want: dict) -> list[str]:
    """Why two sources are not the same data ([] when their fingerprints agree)."""
    if have.get("fingerprint") is not None and have.get("fingerprint") == want.get("fingerprint"):
        return []
    keys = sorted((set(have) | set(want)) - _NOT_IDENTITY - {"fingerprint"})
    diff = [
        f"{k}: {have.get(k)!r} then, {want.get(k)!r} now"
        for k in keys
        if have.get(k) != want.get(k)
    ]
    return ["data: " + ("; ".join(diff) if diff else "another fingerprint")]


def save_grid(
    state,
    metrics: dict,
    out: str | Path,
    *,
    extra: dict | None = None,
    labels: dict[int, str] | None = None,
    source_info: dict | None = None,
    run_info: dict | None = None,
) -> list[dict]:
    """Write every SAE of ``state`` and the summary; returns the summary rows.

    ``extra`` adds columns per SAE ({(sparsity, n): {col: value}}), e.g. ground-truth scores;
    ``labels`` names sizes as the user gave them (e.g. '8x').
    """
    out = Path(out)
    cfg = state.config
    knob = cfg.family.knob.name
    write_train_config(out, cfg, run_info)
    # What runs wrote before architectures existed (every one of them relu): the l1 column and
    # keys, kept for relu so that readers of those runs read these alike.
    before_archs = cfg.arch == DEFAULT_ARCH
    rows = []
    for (value, n), sae in state.saes().items():
        key = (value, n)
        row = {
            "arch": cfg.arch,
            "sparsity_name": knob,
            "sparsity": value,
            **({"l1": value} if before_archs else {}),
            "dict_size": n,
            "dict_label": (labels or {}).get(n, str(n)),
            "steps": state.step,
            "samples": state.step * cfg.batch_size,
            **metrics[key],
            **(extra or {}).get(key, {}),
        }
        sae.save(
            out / SAES_DIR / dict_dirname(cfg.arch, knob, value, n),
            {
                "arch": cfg.arch,
                "sparsity_name": knob,
                "sparsity": value,
                **({"l1": value, "l1_norm": cfg.l1_norm} if before_archs else {}),
                "training": to_dict(cfg),
                "metrics": row,
                "source": source_info or {},
                **(run_info or {}),
            },
        )
        stats = state.latents.get(key) if hasattr(state, "latents") else None
        if stats:
            write_latent_stats(out / SAES_DIR / dict_dirname(cfg.arch, knob, value, n), stats)
        rows.append(row)
    write_summary(rows, out / SUMMARY_FILE)
    write_text_atomic(out / HISTORY_FILE, "".join(json.dumps(rec) + "\n" for rec in state.history))
    return rows


def write_latent_stats(directory: str | Path, stats: dict[str, torch.Tensor]) -> None:
    """Per-latent statistics of one dictionary (``LATENTS_FILE``), written whole or not at all."""
    tensors = {k: v.detach().to(torch.int64).cpu().contiguous() for k, v in stats.items()}
    write_bytes_atomic(Path(directory) / LATENTS_FILE, safetensors_bytes(tensors))


def read_latent_stats(directory: str | Path) -> dict[str, torch.Tensor] | None:
    """``LATENTS_FILE`` of a saved dictionary, or None for a run written before it existed."""
    path = Path(directory) / LATENTS_FILE
    return load_file(str(path)) if path.exists() else None


def write_summary(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def read_summary(path: str | Path) -> list[dict]:
    """Rows of a summary.csv with numbers parsed back."""

    def parse(v: str):
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def read_history(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sparsity_of(config: dict) -> float:
    """The knob value a saved dictionary was trained at (old ReLU folders only say ``l1``)."""
    return config["sparsity"] if "sparsity" in config else config["l1"]


def load_saes(out: str | Path) -> dict[tuple[float, int], object]:
    """Every dictionary a grid run wrote, keyed by (sparsity value, dict_size)."""
    saes = {}
    for d in dictionary_dirs(out):
        sae = load_dictionary(d)
        saes[(sparsity_of(sae.config), sae.d_sae)] = sae
    if not saes:
        raise FileNotFoundError(f"no SAEs under {out}/{SAES_DIR}: was the training run finished?")
    return saes
