"""Run folders on S3: `toy --out s3://...` and `train --out s3://...` against test_s3's moto server.

A run on S3 works in a local mirror and copies it up; what is checked is what a user sees on
the bucket: the same bytes as the same run with a local --out, a run killed with SIGKILL after a
checkpoint resumes from the bucket alone (its mirror deleted) to the uninterrupted run's bytes,
a finished run is recognised, and a run over several nodes or without a bucket is refused
before any training.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from test_s3 import moto_server, s3, tree  # noqa: E402,F401 (the fixtures, shared)
from test_train_store import toy_store, train_cli  # noqa: E402,F401
from unsuperpose import storage  # noqa: E402
from unsuperpose.cli import main  # noqa: E402
from unsuperpose.errors import UserError  # noqa: E402
from unsuperpose.run_folder import check_run_folder  # noqa: E402
from waiting import kill_when  # noqa: E402

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
    "--no-progress",
    "--wandb",
    "disabled",
]
SHORT = TOY + ["--steps", "150"]
LONG = TOY + ["--steps", "600", "--checkpoint-every", "100"]


def same_run(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    """The same files with the same bytes, but for log.jsonl's wall-clock times and speeds."""
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "log.jsonl")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own, so that its mirrors are known and start absent."""
    monkeypatch.setenv("UNSUPERPOSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_toy_on_s3_equals_the_same_run_on_a_local_folder_and_is_found_finished(
    s3, cache, tmp_path, capsys
):
    local = tmp_path / "local"
    assert main(SHORT + ["--out", str(local)]) == 0
    url = f"{s3}/runs/toy"
    capsys.readouterr()
    assert main(SHORT + ["--out", url]) == 0
    out = capsys.readouterr().out
    assert f"wrote {url}/summary.csv" in out and str(cache) not in out
    remote, mine = tree(url), tree(local)
    assert {
        "summary.csv",
        "diagnosis.json",
        "train_config.json",
        "source.json",
        "history.jsonl",
    } <= remote.keys()
    assert any(k.startswith("saes/") and k.endswith("/sae.safetensors") for k in remote)
    assert not any(k.startswith("checkpoint") for k in remote)
    assert same_run(remote, mine)
    assert not (cache / "runs-mirror").exists() or not any((cache / "runs-mirror").iterdir())

    assert main(SHORT + ["--out", url]) == 0
    assert f"{url} already holds this grid" in capsys.readouterr().out
    assert same_run(tree(url), mine)
    # Other settings: refused, naming the URL, and the bucket's run is left as it was.
    assert main(TOY + ["--steps", "160", "--out", url]) == 2
    assert f"{url} holds a finished grid made otherwise" in capsys.readouterr().err
    assert same_run(tree(url), mine)
    assert main(SHORT + ["--out", url, "--force"]) == 0  # trained again, to the same bytes
    assert same_run(tree(url), mine)


def _env(cache: Path) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "UNSUPERPOSE_CACHE": str(cache),
    }


def _run(args: list[str], out: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unsuperpose", *args, "--out", out],
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_run_on_s3_killed_after_a_checkpoint_resumes_from_the_bucket_alone(s3, cache, tmp_path):
    straight = tmp_path / "straight"
    done = _run(LONG, str(straight), cache)
    assert done.returncode == 0, done.stderr

    url = storage.location(f"{s3}/runs/long")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unsuperpose", *LONG, "--out", str(url)],
        env=_env(cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # state.json is copied up last, so while it is on the bucket the checkpoint there is whole;
    # it is deleted first when the next checkpoint goes up, so the kill waits for a moment
    # when the frozen run has one there.
    kill_when(lambda: storage.exists(url / "checkpoint/state.json"), proc, "checkpoint", poll=0.05)
    step = storage.read_json(url / "checkpoint/state.json")["step"]
    assert 0 < step < 600, proc.stderr.read()
    assert not storage.exists(url / "summary.csv")

    shutil.rmtree(cache / "runs-mirror")  # another machine: only the bucket has the run
    resumed = _run(LONG, str(url), cache)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from the checkpoint at step {step:,}" in resumed.stdout
    assert same_run(
        tree(url), tree(straight)
    )  # and the bucket's checkpoint is gone, as a local one


@pytest.mark.torchrun
def test_two_torchrun_ranks_on_one_node_write_one_process_bytes_to_s3(s3, cache, tmp_path):
    solo = tmp_path / "solo"
    assert _run(SHORT, str(solo), cache).returncode == 0
    url = f"{s3}/runs/duo"
    duo = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "unsuperpose",
            *SHORT,
            "--out",
            url,
        ],
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert duo.returncode == 0, duo.stderr
    assert duo.stdout.count("wrote ") == 1
    remote, mine = tree(url), tree(solo)
    # The configs record the two processes; the weights and scores are one process's bytes.
    assert remote.keys() == mine.keys()
    same = [
        k
        for k in mine
        if k.endswith(".safetensors") or k in ("summary.csv", "history.jsonl", "diagnosis.json")
    ]
    assert len(same) == 4 + 4 + 3  # SAEs, their per-latent statistics, the three files
    for k in same:
        assert remote[k] == mine[k], k


def test_train_on_a_local_store_into_s3_equals_a_local_out(s3, cache, toy_store, tmp_path):
    assert train_cli(toy_store, tmp_path / "local") == 0
    assert train_cli(toy_store, f"{s3}/grids") == 0
    remote = tree(f"{s3}/grids/1x+2x")
    assert any(k.startswith("saelens/") for k in remote)
    assert same_run(remote, tree(tmp_path / "local" / "1x+2x"))


def test_s3_out_over_several_nodes_or_without_its_bucket_is_refused_before_training(
    s3, cache, monkeypatch, capsys
):
    with monkeypatch.context() as env:
        env.setenv("RANK", "0")
        env.setenv("WORLD_SIZE", "4")
        env.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(UserError, match="several nodes"):
            check_run_folder(storage.location(f"{s3}/runs/x"))
    check_run_folder(storage.location(f"{s3}/runs/x"))  # one node (or no torchrun): fine
    assert main(SHORT + ["--out", "s3://no-such-bucket-here/runs/toy"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
