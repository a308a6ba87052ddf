"""`unsuperpose analyze splice`: the glue between a dictionary, its LM, its store and a text.

    unsuperpose analyze splice --dict runs/sae/tiny/layer1/1x+2x+4x+8x [--corpus FILE] \
        [--tokens N] [--out FILE.json]

The LM, the hook and the store (for the mean ablation) are the ones the dictionary's config.json
recorded at training. The text is the LM's held-out validation documents unless ``--corpus``
names a local file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from unsuperpose import distributed, storage
from unsuperpose.analyze.splice_grid import SpliceError, store_mean, validation_blocks
from unsuperpose.commands._flags import FlagDeprecation
from unsuperpose.commands.errors import stage_errors
from unsuperpose.config import write_json_atomic
from unsuperpose.errors import UserError

DEFAULT_TOKENS = 16_384  # predicted tokens: delta CE's standard error is then ~1e-3 nats (README)


def read_text_blocks(path: Path, n_ctx: int, tokenizer=None) -> list[np.ndarray]:
    """A local text file, documents separated by blank lines: each document packed as the LM's
    corpus is (``tokenizer``'s BOS, its tokens, its end-of-text; GPT-2's <|endoftext|> when
    None), concatenated, cut into blocks of ``n_ctx`` (the last one shorter)."""
    from unsuperpose.lm import gpt2_tokenizer

    if not path.is_file():
        raise UserError(
            f"--corpus {path}: no such file (a text file, documents separated by blank lines)"
        )
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if not docs:
        raise UserError(f"--corpus {path} holds no text")
    stream = [i for ids in (tokenizer or gpt2_tokenizer()).encode_documents(docs) for i in ids]
    blocks = [
        np.asarray(stream[i : i + n_ctx], dtype=np.int64) for i in range(0, len(stream), n_ctx)
    ]
    blocks = [b for b in blocks if len(b) >= 2]  # a block of one token predicts nothing
    if not blocks:
        raise UserError(f"--corpus {path} has fewer than two tokens")
    return blocks


def run_splice(args, local=None, show=str) -> int:
    """``local``: where ``args.dict_path`` is read (a local copy of a URL; default: itself);
    ``show``: how its paths are named in the output (the URL)."""
    from unsuperpose.analyze.features import find_saes
    from unsuperpose.analyze.splice import splice_eval
    from unsuperpose.harvest import ActivationStore
    from unsuperpose.lm import load_bridge
    from unsuperpose.train import load_dictionary

    with stage_errors(FileNotFoundError):  # no dictionary there
        sae_dirs = find_saes(args.dict_path if local is None else local)
    saes = {p.name: load_dictionary(p) for p in sae_dirs}
    sources = {(s.config.get("source") or {}).get("path") for s in saes.values()}
    first = next(iter(saes.values())).config.get("source") or {}
    if first.get("kind") != "activation_store" or len(sources) != 1:
        raise UserError(
            f"{args.dict_path}: the spliced-in evaluation needs dictionaries trained on one "
            "LM activation store (toy dictionaries have no LM)"
        )
    if args.tokens is not None and args.tokens < 1:
        raise UserError("--tokens must be at least 1")
    model_dir = Path(first["model_dir"])
    store = ActivationStore(first["path"])
    hook, n_ctx = store.provenance.hook, int(store.provenance.n_ctx)
    if args.corpus is not None:
        from unsuperpose.lm import model_tokenizer

        blocks = read_text_blocks(args.corpus, n_ctx, model_tokenizer(model_dir))
        text = {"file": str(args.corpus.resolve())}
    else:
        with stage_errors(SpliceError):
            blocks, text = validation_blocks(
                model_dir, n_ctx, args.tokens or DEFAULT_TOKENS, store.provenance.corpus
            )
    device = distributed.resolve_device(getattr(args, "device", "cpu"))
    bridge = load_bridge(model_dir, device=device)
    result = splice_eval(
        bridge,
        hook,
        blocks,
        {k: (lambda x, s=s.to(device): s(x)[0]) for k, s in saes.items()},  # noqa: B008 (binds each SAE)
        mean=store_mean(store),
        batch_size=args.batch_size,
        progress=not args.no_progress,
        device=device,
    )
    result.update(
        model_dir=str(model_dir),
        hook=hook,
        store=str(store.path),
        text=text,
        device=str(device),
        dictionaries={k: show(p) for k, p in zip(saes, sae_dirs)},
    )
    out = splice_file(args.out, args.dict_path, warn=True)
    if storage.is_remote(out):
        storage.write_json(out, result)
    else:
        write_json_atomic(out, result)
    print(
        f"spliced into {model_dir} at {hook}, {result['tokens']:,} predicted tokens "
        f"({'file ' + text['file'] if 'file' in text else 'the LM validation documents'}): "
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
