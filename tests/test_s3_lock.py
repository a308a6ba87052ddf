"""The lease that keeps two writers of one S3 output apart (unsuperpose.locking), against
test_s3's moto server: created by one conditional PUT, refused to a second writer, renewed while
its holder lives, taken over once a SIGKILLed holder's lease has expired, never deleted by a
holder that lost it, and what `toy --out s3://...` runs under.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from test_s3 import moto_server, s3  # noqa: E402,F401 (the fixtures, shared)
from unsuperpose import locking, storage  # noqa: E402
from unsuperpose.cli import main  # noqa: E402
from unsuperpose.errors import UserError  # noqa: E402
from unsuperpose.train.grid import run_mirror  # noqa: E402

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("one_torch_thread")]

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
    "--steps",
    "50",
    "--no-progress",
    "--wandb",
    "disabled",
]
# A holder in a process of its own, with a short lease; it says when it holds it, then waits.
HOLDER = (
    "import sys; from unsuperpose import locking; "
    "locking.acquire(sys.argv[1], lease_s=3, renew_s=0.25); print('held', flush=True); "
    "sys.stdin.read()"
)


def test_a_lease_is_created_once_refused_to_a_second_writer_and_deleted_on_release(s3):
    out = storage.location(f"{s3}/runs/toy")
    lease = storage.location(f"{s3}/runs/.toy.lock")  # beside the run, never inside it
    first = locking.acquire(out, what="the run folder")
    record = storage.read_json(lease)
    assert record["pid"] == os.getpid() and record["token"] == first.holder.token
    assert record["lease_seconds"] == locking.LEASE_SECONDS and "expires" in record
    with pytest.raises(locking.Locked) as refused:
        locking.acquire(out, what="the run folder")
    message = str(refused.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message
    assert f"started {first.holder.started}" in message and "lease expires in" in message
    first.release()
    assert not storage.exists(lease)
    with locking.hold(out):
        assert storage.exists(lease)
    assert not storage.exists(lease)


def test_a_renewed_lease_outlives_its_lease_time_and_a_sigkilled_holders_is_taken_over(s3, capsys):
    out = f"{s3}/runs/toy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, out],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        assert locking.current_holder(out).pid == holder.pid
        time.sleep(4)  # longer than its 3 s lease: only its renewals keep it
        with pytest.raises(locking.Locked, match=f"pid {holder.pid} "):
            locking.acquire(out)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # Dead on this machine (its pid runs no more): taken over at once, before its lease expires.
    mine = locking.acquire(out)
    err = capsys.readouterr().err
    assert "took over the lock" in err and f"pid {holder.pid} no longer runs on this machine" in err
    assert locking.current_holder(out).token == mine.holder.token
    mine.release()
    assert locking.current_holder(out) is None


def test_a_lease_from_another_machine_is_refused_until_it_expires_then_taken_over(s3, capsys):
    out = storage.location(f"{s3}/runs/toy")
    elsewhere = {
        "pid": 1,
        "host": "elsewhere",
        "command": "unsuperpose toy",
        "token": "theirs",
        "started": "2026-01-01T00:00:00+00:00",
        "pid_space": "another-machine/1",
        "lease_seconds": 8,  # long enough that a busy machine still sees it refused first
    }
    storage.write_json(locking.lock_path(out), elsewhere)  # as a holder there leaves it, killed
    refusals = 0
    deadline = time.monotonic() + 60
    while True:  # refused until its lease expires by the server's clock, then taken over
        try:
            mine = locking.acquire(out)
            break
        except locking.Locked as exc:
            assert "pid 1 on elsewhere" in str(exc) and time.monotonic() < deadline
            refusals += 1
            time.sleep(0.2)
    assert refusals > 0
    err = capsys.readouterr().err
    assert "took over the lock" in err and "its lease expired" in err
    mine.release()


def test_a_holder_whose_lease_was_taken_over_stops_and_leaves_the_new_lease(s3):
    out = storage.location(f"{s3}/runs/toy")
    lost = threading.Event()
    lease = locking.acquire(out, renew_s=0.2, on_lost=lost.set)
    # Another writer's lease where ours was (as after our process stalled past its lease time).
    storage.write_json(
        locking.lock_path(out), {**lease.holder.__dict__, "token": "theirs", "lease_seconds": 60}
    )
    assert lost.wait(timeout=60) and lease.lost
    with pytest.raises(UserError, match="lost the lease"):  # a run's copies up stop here
        run_mirror(out).upload_checkpoint()
    lease.release()
    assert locking.current_holder(out).token == "theirs"


def test_toy_on_s3_is_refused_while_another_holds_the_run_and_runs_after(s3, capsys):
    url = f"{s3}/runs/toy"
    other = locking.acquire(url)
    try:
        assert main([*TOY, "--out", url]) == 2
        err = capsys.readouterr().err
        assert f"the run folder {url} is being written by another run" in err
        assert f"pid {os.getpid()}" in err and not storage.exists(storage.location(url))
    finally:
        other.release()
    assert main([*TOY, "--out", url]) == 0
    assert storage.exists(storage.location(url) / "summary.csv")
    assert locking.current_holder(url) is None
