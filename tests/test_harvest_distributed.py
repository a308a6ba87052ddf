"""`unsuperpose harvest` under torchrun (gloo, 2 processes on this CPU) and on an explicit device.

The point: ranks split the rows for real (each runs about half the forward batches), the store
they write together is byte-for-byte the store one process writes, and an interrupted store
resumes with any number of ranks. torchrun is started as `python -m torch.distributed.run`
with --standalone (a free port) and one thread per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import zarr

from unsuperpose.cli import main
from unsuperpose.harvest import loop, ranks, store, stream

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
ARRAYS = (store.ACTS, *store.ROW_ARRAYS)
LAYERS = (1, 2)
# 1,312 rows of the tiny corpus: 21 chunks of 64 rows (the last one 32), one forward batch
# (2 blocks of 32 tokens) each.
ALIGNED = ["--chunk-rows", "64", "--batch-size", "2"]
# Chunks of 100 rows, batches of 96: units of 4 chunks, and batches straddling two units.
STRADDLING = ["--chunk-rows", "100", "--batch-size", "3"]

# Runs the CLI with stream.forward wrapped: counts calls, and on rank $KILL_RANK kills its own
# process with SIGKILL after $KILL_AFTER calls (a crash torchrun sees, not a clean exit).
LAUNCHER = textwrap.dedent("""
    import os, signal, sys
    from unsuperpose.harvest import stream
    real, calls = stream.forward, [0]
    def forward(*args, **kw):
        calls[0] += 1
        if (os.environ.get("RANK") == os.environ.get("KILL_RANK")
                and calls[0] > int(os.environ["KILL_AFTER"])):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kw)
    stream.forward = forward
    argv = sys.argv[1:]
    if os.environ.get("RANK") == "1":
        argv += os.environ.get("RANK1_EXTRA", "").split()
    from unsuperpose.cli import main
    sys.exit(main(argv))
""")


def harvest_args(lm: Path, out: Path, flags: list[str]) -> list[str]:
    return [
        "harvest",
        "--lm",
        str(lm),
        "--layer",
        ",".join(map(str, LAYERS)),
        "--out",
        str(out),
        "--no-progress",
        *flags,
    ]


def torchrun(nproc: int, args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    launcher = tmp / "launch.py"
    launcher.write_text(LAUNCHER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(launcher),
        *args,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "KILL_AFTER": "1000000", **env},
    )


def files(path: Path) -> dict[str, bytes]:
    """Every file of the store's arrays (chunks and array metadata), by relative path."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for name in ARRAYS
        for p in sorted((path / name).rglob("*"))
        if p.is_file()
    }


def assert_same_bytes(a: Path, b: Path) -> None:
    for layer in LAYERS:
        fa, fb = files(a / f"layer{layer}.zarr"), files(b / f"layer{layer}.zarr")
        assert fa.keys() == fb.keys()
        differ = [k for k in fa if fa[k] != fb[k]]
        assert not differ, f"layer {layer}: files differ: {differ[:5]}"


def attrs(out: Path, layer: int = 1) -> dict:
    return dict(zarr.open_group(out / f"layer{layer}.zarr", mode="r").attrs)


@pytest.fixture(scope="module")
def reference(tiny_lm_dir, tmp_path_factory):
    """A one-process harvest per set of flags (made once, in this process)."""
    made: dict[tuple, Path] = {}

    def get(flags: list[str]) -> Path:
        if tuple(flags) not in made:
            out = tmp_path_factory.mktemp("reference")
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert main(harvest_args(tiny_lm_dir, out, flags)) == 0
            finally:
                torch.set_num_threads(before)
            made[tuple(flags)] = out
        return made[tuple(flags)]

    return get


# -- who does what ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks,batch_rows", [([64], 64), ([64, 128], 96), ([100], 96), ([256], 64)]
)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("first,rows", [(0, 1312), (448, 1312), (0, 100), (1200, 1312)])
def test_units_give_every_row_to_one_rank_in_whole_chunks(chunks, batch_rows, world, first, rows):
    unit = ranks.work_unit(chunks, batch_rows)
    assert all(unit % c == 0 for c in chunks)
    if unit % batch_rows == 0:  # aligned: no forward batch is computed by two ranks
        assert unit == __import__("math").lcm(*chunks, batch_rows)
    rounds = ranks.n_rounds(first, rows, unit, world)
    owner: dict[int, int] = {}
    batches = []
    for r in range(world):
        pieces = ranks.rank_pieces(first, rows, unit, batch_rows, r, world)
        assert pieces == sorted(pieces, key=lambda p: p[2])
        for rnd, b, lo, hi in pieces:
            assert 0 <= rnd < rounds and b * batch_rows <= lo < hi <= (b + 1) * batch_rows
            # in round j, rank r holds unit j*world + r (counted from the unit of `first`)
            assert lo // unit - first // unit == rnd * world + r
            lo_r, hi_r = ranks.round_rows(rnd, first, rows, unit, world)
            assert lo_r <= lo and hi <= hi_r
            for row in range(lo, hi):
                assert row not in owner
                owner[row] = r
        batches.append({b for _, b, _, _ in pieces})
    assert sorted(owner) == list(range(first, rows))
    # a unit boundary inside the store is a chunk boundary of every store
    for row in range(first + 1, rows):
        if owner[row] != owner[row - 1]:
            assert all(row % c == 0 for c in chunks)
    n_batches = -(-rows // batch_rows) - first // batch_rows
    n_units = -(-rows // unit) - first // unit
    if unit % batch_rows == 0:
        assert sum(len(b) for b in batches) == n_batches  # the split is real: no batch twice
    else:  # only a batch across a unit boundary is computed twice, and units hold >= 4 batches
        assert sum(len(b) for b in batches) <= n_batches + n_units - 1
        assert unit >= ranks.STRADDLE_BATCHES * batch_rows
    if world > 1 and n_units >= 2 and n_batches >= 4:
        assert max(len(b) for b in batches) < n_batches


def test_rows_of_one_rank_alone_are_the_plain_sequence_of_batches():
    pieces = ranks.rank_pieces(448, 1312, 192, 96, 0, 1)
    assert [b for _, b, _, _ in pieces] == sorted({b for _, b, _, _ in pieces})
    assert pieces[0][2] == 448 and pieces[-1][3] == 1312
    assert all(p[3] == q[2] for p, q in zip(pieces, pieces[1:]))


# -- torchrun, 2 processes ------------------------------------------------------------------------


@pytest.mark.torchrun
def test_two_ranks_write_the_bytes_one_process_writes_each_doing_half(
    tiny_lm_dir, reference, tmp_path
):
    out = tmp_path / "two"
    res = torchrun(2, harvest_args(tiny_lm_dir, out, ALIGNED), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_bytes(reference(ALIGNED), out)
    a = attrs(out)
    assert a["world_size"] == 2 and a["device"] == "cpu" and a["precision"] == "fp32"
    assert a["complete"] and a["rows_written"] == a["rows_planned"] == 1312
    [run] = a["harvest_runs"]
    shares = run["ranks"]
    assert [s["rank"] for s in shares] == [0, 1]
    # 21 batches of one chunk each: 11 for rank 0, 10 for rank 1; a rank redoing the whole job
    # (which would write the same bytes) would show 21
    assert [s["forward_batches"] for s in shares] == [11, 10]
    assert [s["rows"] for s in shares] == [10 * 64 + 32, 10 * 64]  # the last unit: 32 rows
    # only rank 0 talks
    assert res.stdout.count("harvest: wrote") == len(LAYERS)
    assert res.stdout.count("GiB of disk needed") == 1
    assert "rank 1 (cpu) ran 10 forward batches and wrote 640 rows" in res.stdout
    saved = json.loads((out / "layer1.zarr" / loop.CONFIG_FILE).read_text())
    assert saved["device"] == "cpu" and saved["precision"] == "fp32"


@pytest.mark.torchrun
def test_two_ranks_killed_midway_resume_with_one_process(tiny_lm_dir, reference, tmp_path):
    out = tmp_path / "cut"
    # Rank 1 dies (SIGKILL) in its 6th batch, i.e. in round 5; torchrun then stops rank 0.
    res = torchrun(
        2, harvest_args(tiny_lm_dir, out, ALIGNED), tmp_path, KILL_RANK="1", KILL_AFTER="6"
    )
    assert res.returncode != 0
    # Rank 0 records progress store by store, so the kill can land between two layers' records
    # (seen: layer 1 at 512 rows, layer 2 at 384): each store's progress is its own.
    written = {}
    for layer in LAYERS:
        a = attrs(out, layer)
        written[layer] = a["rows_written"]
        assert not a["complete"] and written[layer] <= 10 * 64  # at most rounds 0..4 recorded
    assert main(harvest_args(tiny_lm_dir, out, ALIGNED)) == 0  # one process finishes it
    assert_same_bytes(reference(ALIGNED), out)
    for layer in LAYERS:
        a = attrs(out, layer)
        assert a["world_size"] == 1 and a["complete"]
        assert [r["world_size"] for r in a["harvest_runs"]] == [2, 1]
        resumed = a["harvest_runs"][1]
        # each store resumes from its own record, never from an earlier row
        assert resumed["rows_from"] == written[layer]
        # one forward pass serves every store: it starts at the least advanced one
        assert resumed["ranks"][0]["rows"] == 1312 - min(written.values())


@pytest.mark.torchrun
def test_one_process_interrupted_resumes_with_two_ranks_batches_straddling_units(
    tiny_lm_dir, reference, tmp_path, monkeypatch
):
    out = tmp_path / "cut"
    real, calls = stream.forward, [0]

    def forward(*args, **kw):
        calls[0] += 1
        if calls[0] > 4:  # the width probe, then 3 batches: Ctrl-C in the 4th
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(stream, "forward", forward)
    assert main(harvest_args(tiny_lm_dir, out, STRADDLING)) == 130
    monkeypatch.undo()
    written = attrs(out)["rows_written"]
    assert 0 < written < 1312 and written % 100 == 0
    res = torchrun(2, harvest_args(tiny_lm_dir, out, STRADDLING), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_bytes(reference(STRADDLING), out)
    a = attrs(out)
    assert a["world_size"] == 2 and [r["world_size"] for r in a["harvest_runs"]] == [1, 2]
    run = a["harvest_runs"][1]
    assert run["rows_from"] == written
    shares = run["ranks"]
    assert sum(s["rows"] for s in shares) == 1312 - written and all(s["rows"] > 0 for s in shares)
    total_batches = -(-1312 // 96) - written // 96
    # units of 200 rows against batches of 96: a straddling batch is run by both ranks, no more
    assert all(s["forward_batches"] < total_batches for s in shares)
    assert sum(s["forward_batches"] for s in shares) <= total_batches + len(range(0, 1312, 200))


@pytest.mark.torchrun
def test_ranks_started_with_different_flags_are_refused(tiny_lm_dir, tmp_path):
    out = tmp_path / "two"
    res = torchrun(2, harvest_args(tiny_lm_dir, out, ALIGNED), tmp_path, RANK1_EXTRA="--tokens 700")
    assert res.returncode != 0
    assert "disagree on the harvest settings" in res.stdout + res.stderr
    assert "start every process with the same command" in res.stdout + res.stderr
    assert not (out / "layer1.zarr").exists()  # refused before anything was written


@pytest.mark.torchrun
def test_a_store_rank_0_refuses_is_the_same_one_line_error_on_every_rank(tiny_lm_dir, tmp_path):
    out = tmp_path / "kept"
    assert main(harvest_args(tiny_lm_dir, out, [*ALIGNED, "--tokens", "256"])) == 0
    res = torchrun(2, harvest_args(tiny_lm_dir, out, [*ALIGNED, "--tokens", "128"]), tmp_path)
    assert res.returncode != 0
    said = (
        "more than the 128 asked for; harvest --tokens 256 to keep it, or rewrite it with --force"
    )
    # rank 0 refuses in its plan; rank 1 raises the same StoreError, not "rank 0 failed"
    assert res.stderr.count(f"unsuperpose harvest: error: {out}") == 2, res.stderr[-3000:]
    assert res.stderr.count(said) == 2 and "rank 0 failed" not in res.stderr
    assert attrs(out)["rows_planned"] == 256


# -- devices and precision (device-agnostic code, run on this CPU) --------------------------------


@pytest.mark.slow
def test_explicit_cpu_device_and_bf16_autocast_are_recorded(
    tiny_lm_dir, reference, tmp_path, capsys
):
    out = tmp_path / "cpu"
    assert main(harvest_args(tiny_lm_dir, out, [*ALIGNED, "--device", "cpu"])) == 0
    assert_same_bytes(reference(ALIGNED), out)
    assert attrs(out)["device"] == "cpu" and attrs(out)["precision"] == "fp32"
    bf = tmp_path / "bf16"
    assert (
        main(harvest_args(tiny_lm_dir, bf, [*ALIGNED, "--device", "cpu", "--precision", "bf16"]))
        == 0
    )
    assert attrs(bf)["precision"] == "bf16"
    x = zarr.open_group(out / "layer1.zarr")["acts"][:].astype("float32")
    y = zarr.open_group(bf / "layer1.zarr")["acts"][:].astype("float32")
    assert (x != y).any()  # the forward really ran in bf16
    assert abs(x - y).max() < 0.05 * abs(x).max()  # ... and stayed close to fp32
    capsys.readouterr()
    # a store keeps its precision: an explicit other one is refused (before the store grows),
    # auto continues in it
    part = tmp_path / "part"
    assert (
        main(harvest_args(tiny_lm_dir, part, [*ALIGNED, "--tokens", "500", "--precision", "bf16"]))
        == 0
    )
    assert main(harvest_args(tiny_lm_dir, part, [*ALIGNED, "--precision", "fp32"])) == 2
    assert (
        "started with a bf16 forward; continue it with --precision bf16" in capsys.readouterr().err
    )
    assert attrs(part)["rows_planned"] == 500
    assert main(harvest_args(tiny_lm_dir, part, ALIGNED)) == 0
    assert "continuing" in capsys.readouterr().out and attrs(part)["precision"] == "bf16"
    assert_same_bytes(bf, part)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_one_is_one_clear_error(tiny_lm_dir, tmp_path, capsys):
    assert main(harvest_args(tiny_lm_dir, tmp_path / "gpu", [*ALIGNED, "--device", "cuda"])) == 2
    err = capsys.readouterr().err
    assert "--device cuda: this machine has no usable CUDA GPU" in err and "--device cpu" in err
    assert "Traceback" not in err and not (tmp_path / "gpu").exists()
