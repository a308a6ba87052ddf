"""One writer per output (unsuperpose.locking): a second writer into a run folder or a store is
refused at once, naming the first, which ends as if it had run alone; a lock whose holder was
SIGKILLed is taken over; under torchrun rank 0 holds it for the job.

Writers race deterministically: the first is started and, once its lock names it, stopped with
SIGSTOP (its lock stays held), the second runs while it is stopped, then the first continues.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_distributed import ENV, SHORT, assert_same_bytes, solo, torchrun_cmd  # noqa: F401
from test_train_store import toy_store, train_cli  # noqa: F401 (the fixture, shared)
from unsuperpose import distributed, locking
from unsuperpose.cli import main
from unsuperpose.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFUSED = "is being written by another run"
HARVEST = [
    "--layer",
    "1",
    "--tokens",
    "640",
    "--chunk-rows",
    "64",
    "--batch-size",
    "2",
    "--no-progress",
    "--device",
    "cpu",
]
TOY = [
    "toy",
    "--h",
    "16",
    "--g",
    "32",
    "--dict-sizes",
    "1/2x,1x",
    "--l1",
    "1e-4,1e-3",
    "--batch-size",
    "64",
    "--no-progress",
    "--wandb",
    "disabled",
]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "unsuperpose", *args]


def holder_of(output: Path, proc: subprocess.Popen, timeout: float = 600) -> locking.Holder:
    """Wait until ``output``'s lock names its holder (``proc`` or a process below it)."""
    deadline = time.monotonic() + timeout
    while (holder := locking.current_holder(output)) is None:
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before taking the lock: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no lock on {output} after {timeout} s")
        time.sleep(0.02)
    return holder


def assert_names(message: str, holder: locking.Holder, command: str) -> None:
    assert REFUSED in message and "Traceback" not in message
    assert f"pid {holder.pid} on {socket.gethostname()}" in message
    assert f"started {holder.started}" in message and command in message
    assert f"kill {holder.pid}" in message  # what to do


def files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_second_writer_is_refused_naming_the_first_and_the_lock_goes_with_it(tmp_path):
    out = tmp_path / "run"
    first = locking.acquire(out, what="the run folder")
    lock = tmp_path / ".run.lock"  # beside the output, never inside it
    assert locking.current_holder(out) == first.holder and not out.exists()
    with pytest.raises(locking.Locked) as refused:
        locking.acquire(out, what="the run folder")  # another open file: refused as another process
    assert_names(str(refused.value), first.holder, first.holder.command)
    first.release()
    assert not lock.exists()
    with locking.hold(out) as holder:  # free again, and without a warning
        assert locking.current_holder(out) == holder and holder.token != first.holder.token
    assert not lock.exists()


def test_a_rank_writes_only_after_seeing_rank_0s_lock(tmp_path, monkeypatch):
    """Rank 1's side of ``hold``, its collectives stubbed: rank 0's lock must be where it looks."""
    out = tmp_path / "run"
    rank0 = locking.acquire(out)  # rank 0's, seen through a shared folder
    monkeypatch.setattr(distributed, "from_main", lambda fn: rank0.holder)
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with locking.hold(out) as holder:  # sees it, takes nothing
        assert holder == rank0.holder
    assert locking.current_holder(out) == rank0.holder
    rank0.release()  # now as on a node that does not share the folder: nothing there
    with pytest.raises(UserError, match="rank 1 does not see rank 0's lock"):
        with locking.hold(out):
            pytest.fail("a rank went on without seeing rank 0's lock")


@pytest.mark.slow
def test_two_trains_into_one_folder_one_is_refused_and_the_other_equals_a_lone_run(
    toy_store, tmp_path, capsys
):
    shared = tmp_path / "shared"
    flags = [
        "--store",
        str(toy_store),
        "--dict-sizes",
        "1x,2x",
        "--l1",
        "1e-3,1e-2",
        "--steps",
        "40",
        "--batch-size",
        "64",
        "--log-every",
        "10",
        "--wandb",
        "disabled",
        "--no-progress",
    ]
    first = start(cli("train", *flags, "--out", str(shared)))
    holder = holder_of(shared / "1x+2x", first)
    assert holder.pid == first.pid
    os.kill(first.pid, signal.SIGSTOP)  # holds its lock, writes nothing
    try:
        began = time.monotonic()
        assert main(["train", *flags, "--out", str(shared)]) == 2
        took = time.monotonic() - began
        assert_names(capsys.readouterr().err, holder, "unsuperpose train")
        assert took < 30, took
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert train_cli(toy_store, tmp_path / "lone") == 0
    mine, lone = files(shared / "1x+2x"), files(tmp_path / "lone" / "1x+2x")
    weights = [k for k in lone if k.endswith(".safetensors")]
    assert len(weights) == 12  # 4 SAEs, their per-latent statistics and SAELens exports
    for k in weights + ["summary.csv", "history.jsonl"]:
        assert mine[k] == lone[k], k
    assert not list(tmp_path.glob("**/.*.lock"))


@pytest.mark.slow
def test_two_harvests_into_one_store_one_is_refused_and_the_other_equals_a_lone_one(
    tiny_lm_dir, tmp_path, capsys
):
    acts = tmp_path / "acts"
    args = ["harvest", "--lm", str(tiny_lm_dir), *HARVEST]
    first = start(cli(*args, "--out", str(acts)))
    holder = holder_of(acts / "layer1.zarr", first)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert main([*args, "--out", str(acts)]) == 2
        assert_names(capsys.readouterr().err, holder, "unsuperpose harvest")
        # Another store of the same folder is another output: not locked by the first.
        assert main([*args, "--layer", "2", "--out", str(acts)]) == 0
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert main([*args, "--out", str(tmp_path / "lone")]) == 0
    mine, lone = files(acts / "layer1.zarr"), files(tmp_path / "lone" / "layer1.zarr")
    chunks = [k for k in lone if k.split("/")[0] in ("acts", "tokens", "positions", "heldout")]
    assert len(chunks) > 10 and mine.keys() == lone.keys()
    for k in chunks:
        assert mine[k] == lone[k], k
    assert not list(tmp_path.glob("**/.*.lock"))


@pytest.mark.slow
def test_a_lock_whose_holder_was_sigkilled_is_taken_over_with_a_warning(tmp_path, capsys):
    out = tmp_path / "toy"
    doomed = start(cli(*TOY, "--steps", "100000", "--checkpoint-every", "0", "--out", str(out)))
    holder = holder_of(out, doomed)
    doomed.kill()
    doomed.wait(timeout=30)
    assert (tmp_path / ".toy.lock").exists()  # the file stays; the kernel dropped the flock
    assert main([*TOY, "--steps", "50", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "took over the lock" in err and f"pid {holder.pid} no longer runs" in err
    assert f"started {holder.started}" in err
    assert not (tmp_path / ".toy.lock").exists()


@pytest.mark.torchrun
def test_under_torchrun_a_second_job_is_refused_on_every_rank_and_the_first_is_unharmed(
    tmp_path, solo
):
    out = tmp_path / "duo"
    first = start(torchrun_cmd(SHORT, out))
    holder = holder_of(out, first)  # rank 0, a process below torchrun
    assert holder.pid != first.pid
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(
            torchrun_cmd(SHORT, out), env=ENV, capture_output=True, text=True, timeout=300
        )
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    assert second.returncode != 0
    # Rank 0 was refused, and rank 1 with its message, before either wrote anything.
    assert second.stderr.count(REFUSED) >= 2, second.stderr
    assert f"pid {holder.pid} on {socket.gethostname()}" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_same_bytes(solo, out)
    assert not (tmp_path / ".duo.lock").exists()
