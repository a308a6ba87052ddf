"""Harvesting a tiny random GPT-2: what lands in the store, resuming, and refusing bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unsuperpose.harvest import (
    ActivationStore,
    HarvestConfig,
    HarvestError,
    StoreError,
    harvest,
    loop,
    store,
    stream,
)
from waiting import wait_until

N_CTX, VOCAB = 32, 100
SOURCE = {"model_dir": "tiny", "weights_sha256": "w0", "corpus_fingerprint": "c0"}


def planted_marks(shape=(40, N_CTX), seed: int = 0) -> np.ndarray:
    """A held-out mask shaped like validation documents: runs of 1s of uneven length."""
    ends = np.cumsum(np.random.default_rng(seed).integers(20, 90, 64))
    doc = np.searchsorted(ends, np.arange(shape[0] * shape[1]), side="right")
    return (doc % 4 == 1).astype(np.uint8).reshape(shape)


MARKS = planted_marks()


def save_tiny_gpt2(path: Path, d_mlp: int = 64, seed: int = 0) -> Path:
    """A random GPT-2 of the test shape (3 layers, d_model 16), saved as HF files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=3,
        n_embd=16,
        n_inner=d_mlp,
        n_head=2,
        n_positions=N_CTX,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    return path


def boot(path: Path):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run ~10x faster without thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="module")
def bridge(model_dir):
    return boot(model_dir)


@pytest.fixture(scope="module")
def blocks() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (40, N_CTX)).astype(np.uint16)


def cfg(**kw) -> HarvestConfig:
    """Small chunks and batches, so a 1,280-token corpus spans many of each."""
    return HarvestConfig(**{"chunk_rows": 96, "batch_size": 3, **kw})


def run(bridge, blocks, out, source=SOURCE, heldout="planted", **kw) -> list[Path]:
    marks = MARKS[: len(blocks)] if isinstance(heldout, str) else heldout
    return harvest(bridge, blocks, out, cfg(**kw), progress=False, heldout=marks, **source)


def arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(path, mode="r")
    return {
        "acts": g["acts"][:].view(np.int16),
        "tokens": g["tokens"][:],
        "positions": g["positions"][:],
        "heldout": g["heldout"][:],
    }


def assert_same_store(a: Path, b: Path) -> None:
    for name, x in arrays(a).items():
        np.testing.assert_array_equal(x, arrays(b)[name], err_msg=name)
    ga, gb = dict(zarr.open_group(a).attrs), dict(zarr.open_group(b).attrs)
    # The runs that made a store are its history: a resumed store lists one more.
    assert {k: v for k, v in ga.items() if k != "harvest_runs"} == {
        k: v for k, v in gb.items() if k != "harvest_runs"
    }


# -- what is stored ----------------------------------------------------------------------------


def test_rows_equal_an_independent_hf_hook_within_bf16_rounding(
    model_dir, bridge, blocks, tmp_path
):
    from transformers import GPT2LMHeadModel

    [path] = run(bridge, blocks, tmp_path, layer="1")
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    seen = []
    handle = model.transformer.h[1].mlp.act.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.from_numpy(blocks.astype(np.int64)))
    handle.remove()
    want = seen[0].reshape(-1, 64)
    got = torch.from_numpy(ActivationStore(path).read_rows(0, len(want)).astype(np.float32))
    assert got.shape == want.shape == (blocks.size, 64)
    # bfloat16 keeps 8 significant bits: a relative error of at most 2**-8 (plus fp32 noise).
    torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-6)
    assert not torch.equal(got, torch.zeros_like(got))


def test_tokens_and_positions_line_up_with_the_blocks(bridge, blocks, tmp_path):
    rows = 1000  # not a multiple of n_ctx, batch or chunk: the cap cuts a block in half
    [path] = run(bridge, blocks, tmp_path, layer="2", tokens=rows)
    s = ActivationStore(path)
    assert s.rows == rows and s.d == 64
    np.testing.assert_array_equal(s.tokens(), blocks.reshape(-1)[:rows])
    np.testing.assert_array_equal(s.positions(), np.arange(rows) % N_CTX)
    np.testing.assert_array_equal(arrays(path)["heldout"], MARKS.reshape(-1)[:rows])
    np.testing.assert_array_equal(s.heldout_mask(), MARKS.reshape(-1)[:rows] == 1)


def test_store_layout_and_provenance_attributes(bridge, blocks, tmp_path):
    [path] = run(bridge, blocks, tmp_path, layer="1")
    meta = json.loads((path / "zarr.json").read_text())["attributes"]
    assert meta["hook"] == "blocks.1.mlp.hook_post" and meta["layer"] == 1
    assert meta["width"] == 64 and meta["n_ctx"] == N_CTX and meta["dtype"] == "bfloat16"
    assert meta["weights_sha256"] == "w0" and meta["corpus_fingerprint"] == "c0"
    assert meta["heldout_fingerprint"] == loop.mask_fingerprint(MARKS)
    assert meta["rows_written"] == blocks.size and meta["complete"] is True
    assert meta["unsuperpose_version"]
    acts = json.loads((path / "acts" / "zarr.json").read_text())
    assert acts["data_type"] == "bfloat16" and acts["chunk_grid"]["configuration"][
        "chunk_shape"
    ] == [96, 64]
    assert [c["name"] for c in acts["codecs"]] == ["bytes", "zstd", "crc32c"]
    marks = json.loads((path / "heldout" / "zarr.json").read_text())
    assert marks["data_type"] == "uint8" and marks["chunk_grid"]["configuration"][
        "chunk_shape"
    ] == [96]


@pytest.mark.slow
def test_store_opens_with_plain_zarr_once_the_dtype_is_registered(bridge, blocks, tmp_path):
    [path] = run(bridge, blocks, tmp_path, layer="0")
    code = (
        "import sys, zarr, numpy as np\n"
        "try:\n    zarr.open_array(sys.argv[1] + '/acts')\n"
        "except Exception:\n    print('unregistered: refused')\n"
        "import unsuperpose.harvest\n"
        "a = zarr.open_group(sys.argv[1])['acts']\n"
        "print(a.dtype, a.shape, float(np.abs(a[:5].astype(np.float32)).sum()) > 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "unregistered: refused"
    assert out[1] == f"bfloat16 ({blocks.size}, 64) True"


def test_several_layers_in_one_pass_equal_single_layer_passes(bridge, blocks, tmp_path):
    both = run(bridge, blocks, tmp_path / "both", layer="0,2")
    one = run(bridge, blocks, tmp_path / "one", layer="0") + run(
        bridge, blocks, tmp_path / "one", layer="2"
    )
    assert [p.name for p in both] == ["layer0.zarr", "layer2.zarr"]
    for a, b in zip(both, one):
        assert_same_store(a, b)


def test_other_hook_points_and_all_layers(bridge, blocks, tmp_path):
    paths = run(
        bridge, blocks, tmp_path, layer="all", hook="blocks.{layer}.hook_resid_post", tokens=200
    )
    assert [p.name for p in paths] == [f"blocks.{L}.hook_resid_post.zarr" for L in range(3)]
    assert ActivationStore(paths[2]).d == 16
    [embed] = run(bridge, blocks, tmp_path, hook="hook_embed", tokens=200)
    emb = bridge.original_model.transformer.wte.weight.detach()[
        blocks.reshape(-1)[:200].astype(np.int64)
    ]
    torch.testing.assert_close(
        torch.from_numpy(ActivationStore(embed).read_rows(0, 200).astype(np.float32)),
        emb,
        rtol=2**-8,
        atol=1e-6,
    )


def test_the_bridge_forward_stops_after_the_last_needed_block(bridge, blocks, tmp_path):
    """A hook only the bridge computes (the plain model's path: test_harvest_direct.py)."""
    ran, hook = [], "blocks.{layer}.ln2.hook_normalized"
    for L in range(3):
        bridge.hook_dict[f"blocks.{L}.hook_in"].add_hook(lambda x, hook: ran.append(hook.name))
    try:
        run(bridge, blocks[:3], tmp_path, layer="1", hook=hook)
    finally:
        bridge.reset_hooks()
    assert set(ran) == {"blocks.0.hook_in", "blocks.1.hook_in"}
    ran.clear()
    for L in range(3):
        bridge.hook_dict[f"blocks.{L}.hook_in"].add_hook(lambda x, hook: ran.append(hook.name))
    bridge.hook_dict["unembed.hook_in"].add_hook(lambda x, hook: ran.append(hook.name))
    try:
        run(bridge, blocks[:3], tmp_path / "last", layer="2", hook=hook)
    finally:
        bridge.reset_hooks()
    assert (
        "blocks.2.hook_in" in ran and "unembed.hook_in" not in ran
    )  # no logits for the last block


# -- resuming ----------------------------------------------------------------------------------


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Make the forward pass raise KeyboardInterrupt on its ``calls``-th call (a Ctrl-C)."""
    real, seen = stream.forward, []

    def forward(*args, **kw):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(stream, "forward", forward)


def test_interrupted_harvest_resumes_to_an_identical_store(bridge, blocks, tmp_path, monkeypatch):
    [ref] = run(bridge, blocks, tmp_path / "ref", layer="0,1")[:1]
    _interrupt_after(monkeypatch, 6)  # the width probe, then 4 batches of 96 rows: 3 whole chunks
    with pytest.raises(KeyboardInterrupt):
        run(bridge, blocks, tmp_path / "cut", layer="0,1")
    cut = tmp_path / "cut" / "layer0.zarr"
    prog = store.progress(zarr.open_group(cut))
    assert not prog.complete and prog.rows_written == 4 * 96
    assert not store.is_complete(cut) and store.is_complete(ref)
    assert not store.is_complete(tmp_path / "none.zarr")
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(cut)
    partial = ActivationStore(cut, allow_incomplete=True)
    assert partial.rows == 4 * 96
    monkeypatch.undo()
    run(bridge, blocks, tmp_path / "cut", layer="0,1")
    assert_same_store(ref, cut)
    assert_same_store(tmp_path / "ref" / "layer1.zarr", tmp_path / "cut" / "layer1.zarr")


def test_resume_rewrites_chunks_past_the_recorded_progress(bridge, blocks, tmp_path):
    """The state kill -9 can leave: chunks on disk that the progress record does not cover."""
    [ref] = run(bridge, blocks, tmp_path / "ref", layer="1")
    [cut] = run(bridge, blocks, tmp_path / "cut", layer="1")
    g = zarr.open_group(cut, mode="r+")
    store.record_progress(g, 2 * 96 + 50, complete=False)  # mid-chunk: progress lost its tail
    chunk = cut / "acts" / "c" / "3" / "0"
    chunk.write_bytes(b"half a chunk")  # a torn write past the recorded rows
    # A process killed inside zarr's write leaves its temporary (seen in the 30x torchrun repeat).
    partial = cut / "positions" / "c" / "3.c526dd4d5c524d0ba63a5734190dc6c5.partial"
    partial.write_bytes(b"killed mid-write")
    unrelated = cut / "notes.partial"  # not zarr's pattern: not ours to delete
    unrelated.write_bytes(b"x")
    run(bridge, blocks, tmp_path / "cut", layer="1")
    assert not partial.exists() and unrelated.exists()
    unrelated.unlink()
    assert_same_store(ref, cut)


def test_a_larger_token_cap_appends_to_a_finished_store(bridge, blocks, tmp_path):
    [ref] = run(bridge, blocks, tmp_path / "ref", layer="1")
    [grown] = run(bridge, blocks, tmp_path / "grown", layer="1", tokens=500)
    run(bridge, blocks, tmp_path / "grown", layer="1")
    assert_same_store(ref, grown)


def test_a_finished_store_is_left_alone(bridge, blocks, tmp_path, capsys):
    [path] = run(bridge, blocks, tmp_path, layer="1")
    before = (path / "acts" / "c" / "0" / "0").stat().st_mtime_ns
    run(bridge, blocks, tmp_path, layer="1")
    assert "nothing to do" in capsys.readouterr().out
    assert (path / "acts" / "c" / "0" / "0").stat().st_mtime_ns == before


def test_stores_started_with_different_batch_sizes_each_resume_with_their_own(
    bridge, blocks, tmp_path, monkeypatch, capsys
):
    """One pass shared by all stores would batch some of them differently from their first part."""
    ref0 = run(bridge, blocks, tmp_path / "ref", layer="0", batch_size=3)[0]
    ref1 = run(bridge, blocks, tmp_path / "ref", layer="1", batch_size=5)[0]
    out = tmp_path / "cut"
    for layer, batch in (("0", 3), ("1", 5)):
        _interrupt_after(monkeypatch, 4)  # the width probe, then 2 batches
        with pytest.raises(KeyboardInterrupt):
            run(bridge, blocks, out, layer=layer, batch_size=batch)
        monkeypatch.undo()
    real, seen = stream.forward, []

    def forward(bridge, tokens, hooks, stop, **kw):
        seen.append((len(tokens), tuple(hooks)))
        return real(bridge, tokens, hooks, stop, **kw)

    monkeypatch.setattr(stream, "forward", forward)
    run(bridge, blocks, out, layer="0,1", batch_size=4)
    sizes = {
        h: {n for n, hooks in seen[1:] if h in hooks}
        for h in ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post")
    }
    assert sizes == {"blocks.0.mlp.hook_post": {3, len(blocks) % 3}, "blocks.1.mlp.hook_post": {5}}
    printed = capsys.readouterr().out
    assert "different batch sizes (batch size 3: layer0.zarr; batch size 5: layer1.zarr)" in printed
    assert_same_store(ref0, out / "layer0.zarr")
    assert_same_store(ref1, out / "layer1.zarr")


def _strip_heldout(path: Path) -> None:
    """Make ``path`` look like a store written before the held-out array existed."""
    import shutil

    shutil.rmtree(path / "heldout")
    attrs = json.loads((path / "zarr.json").read_text())
    attrs["attributes"].pop("heldout_fingerprint")
    (path / "zarr.json").write_text(json.dumps(attrs))


def test_a_store_from_before_held_out_rows_is_kept_when_finished_else_refused(
    bridge, blocks, tmp_path, capsys
):
    [done] = run(bridge, blocks, tmp_path / "done", layer="1", tokens=500)
    _strip_heldout(done)
    run(bridge, blocks, tmp_path / "done", layer="1", tokens=500)
    assert "predates held-out rows" in capsys.readouterr().out and not (done / "heldout").exists()
    with pytest.raises(StoreError, match=r"before stores recorded held-out rows.*force=True"):
        run(bridge, blocks, tmp_path / "done", layer="1")  # extending it
    with pytest.raises(StoreError, match="corpus_fingerprint"):  # other sources still refused first
        run(
            bridge,
            blocks,
            tmp_path / "done",
            source={**SOURCE, "corpus_fingerprint": "c1"},
            layer="1",
            tokens=500,
        )
    [forced] = run(bridge, blocks, tmp_path / "done", layer="1", force=True)
    assert_same_store(run(bridge, blocks, tmp_path / "ref", layer="1")[0], forced)


KILL_SCRIPT = """
import sys, time, numpy as np, torch
from test_harvest_store import MARKS
from transformer_lens.model_bridge import TransformerBridge
from unsuperpose.harvest import HarvestConfig, harvest
from unsuperpose.harvest import stream
torch.set_num_threads(1)
real = stream.forward
def slow(*a, **k):
    time.sleep(0.05)
    return real(*a, **k)
stream.forward = slow
bridge = TransformerBridge.boot_transformers(sys.argv[1], device="cpu", dtype=torch.float32)
blocks = np.random.default_rng(0).integers(0, 100, (40, 32)).astype(np.uint16)
harvest(bridge, blocks, sys.argv[2], HarvestConfig(layer="1", chunk_rows=96, batch_size=3),
        model_dir="tiny", weights_sha256="w0", corpus_fingerprint="c0", heldout=MARKS,
        progress=False)
"""


@pytest.mark.slow
def test_kill_9_mid_harvest_then_resume_equals_uninterrupted(model_dir, bridge, blocks, tmp_path):
    [ref] = run(bridge, blocks, tmp_path / "ref", layer="1")
    out = tmp_path / "killed"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(model_dir), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    meta = out / "layer1.zarr" / "zarr.json"

    def two_chunks() -> bool:
        if not meta.exists():
            return False
        try:  # zarr.json is replaced whole, but may not yet carry the store's attributes
            return json.loads(meta.read_text())["attributes"].get("rows_written", 0) >= 2 * 96
        except (json.JSONDecodeError, KeyError):
            return False

    wait_until(two_chunks, proc, "two chunks written")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    prog = store.progress(zarr.open_group(out / "layer1.zarr"))
    assert 2 * 96 <= prog.rows_written < blocks.size and not prog.complete
    run(bridge, blocks, out, layer="1")
    assert_same_store(ref, out / "layer1.zarr")


# -- refusing bad input ------------------------------------------------------------------------


def test_layer_out_of_range_is_a_user_error(bridge, blocks, tmp_path):
    with pytest.raises(HarvestError, match=r"layer='3': this model has layers 0\.\.2"):
        run(bridge, blocks, tmp_path, layer="3")
    with pytest.raises(HarvestError, match="layer index"):
        run(bridge, blocks, tmp_path, layer="one")
    assert not any(tmp_path.iterdir())


def test_unknown_hook_is_a_user_error_with_suggestions(bridge, blocks, tmp_path):
    with pytest.raises(
        HarvestError, match=r"no hook point 'blocks.1.mlp.hook_pst'.*blocks.1.mlp.hook_post"
    ):
        run(bridge, blocks, tmp_path, hook="blocks.{layer}.mlp.hook_pst")


def test_width_mismatch_with_an_existing_store_is_refused(bridge, blocks, tmp_path):
    run(bridge, blocks, tmp_path, layer="1", tokens=200)
    narrow = boot(save_tiny_gpt2(tmp_path / "narrow", d_mlp=32))
    with pytest.raises(StoreError, match="width 64.*width 32.*force=True"):
        run(narrow, blocks, tmp_path, layer="1", tokens=200)


def test_a_store_of_other_provenance_is_refused_unless_forced(bridge, blocks, tmp_path):
    [path] = run(bridge, blocks, tmp_path, layer="1", tokens=200)
    other = {**SOURCE, "corpus_fingerprint": "c1"}
    with pytest.raises(StoreError, match="corpus_fingerprint.*force=True"):
        run(bridge, blocks, tmp_path, source=other, layer="1", tokens=200)
    with pytest.raises(
        StoreError, match="more than the 100 asked for; harvest tokens=200 to keep it"
    ):
        run(bridge, blocks, tmp_path, layer="1", tokens=100)
    assert store.provenance(zarr.open_group(path)).corpus_fingerprint == "c0"
    run(bridge, blocks, tmp_path, source=other, layer="1", tokens=100, force=True)
    assert store.provenance(zarr.open_group(path)).corpus_fingerprint == "c1"
    assert ActivationStore(path).rows == 100


def test_a_store_with_other_held_out_marks_is_refused(bridge, blocks, tmp_path):
    """The corpus fingerprint of the "all" split does not cover the seeded validation choice."""
    run(bridge, blocks, tmp_path, layer="1", tokens=200)
    with pytest.raises(StoreError, match="heldout_fingerprint.*force=True"):
        run(bridge, blocks, tmp_path, layer="1", heldout=planted_marks(seed=1))
    with pytest.raises(StoreError, match="heldout_fingerprint"):
        run(bridge, blocks, tmp_path, layer="1", heldout=None)
