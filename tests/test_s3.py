"""Stores on S3: harvest -> train -> analyze against a moto S3 server started on 127.0.0.1 here.

Nothing leaves the machine: the server is a subprocess of the test session, and the AWS
environment is replaced for each test (fake keys, no profile, no instance metadata). What is
checked: an S3 store is the local store byte for byte (chunks with their crc32c, metadata,
harvest_config.json), reads back the same batches and trains to the same weights; a harvest
killed with SIGKILL resumes to the same store; half-created stores are recovered, foreign
prefixes refused; each way of not reaching S3 is one clear error that loses nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from safetensors.torch import load_file  # noqa: E402

from unsuperpose import storage  # noqa: E402
from unsuperpose.cli import main  # noqa: E402
from unsuperpose.harvest import ActivationStore, StoreError  # noqa: E402
from waiting import wait_until

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("one_torch_thread")]

# The CPU even where a GPU is visible: "auto" would harvest there in bf16, other bytes.
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
TRAIN = [
    "--dict-sizes",
    "1x",
    "--l1",
    "1e-3,1e-2",
    "--steps",
    "30",
    "--batch-size",
    "64",
    "--log-every",
    "10",
    "--splice-tokens",
    "0",
    "--wandb",
    "disabled",
    "--no-progress",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_server():
    """``python -m moto.server`` on a free port of 127.0.0.1, for this module's tests."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start on {url}")
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _clear_clients() -> None:
    # fsspec caches clients by their arguments, not by the environment the tests change.
    s3fs = sys.modules.get("s3fs")  # None while a test hides it
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(moto_server, monkeypatch, request):
    """A fresh bucket on the moto server and an AWS environment pointing at it; its URL."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _clear_clients()
    bucket = "b-" + request.node.name.replace("_", "-")[:40].strip("-").lower()
    storage._filesystem(storage.location(f"s3://{bucket}")).mkdir(bucket)
    yield f"s3://{bucket}"
    _clear_clients()


def tree(loc) -> dict[str, bytes]:
    """Every file under a store, local or on S3, with its bytes."""
    loc = storage.location(loc)
    if storage.is_remote(loc):
        fs = storage._filesystem(loc)
        return {k: fs.cat_file((loc / k).key) for k in storage.list_files(loc)}
    return {k: (loc / k).read_bytes() for k in storage.list_files(loc)}


def harvest(lm: Path, out: str, *extra: str) -> int:
    return main(["harvest", "--lm", str(lm), "--out", out, *HARVEST, *extra])


@pytest.fixture
def local_store(tiny_lm_dir, tmp_path) -> Path:
    assert harvest(tiny_lm_dir, str(tmp_path / "local")) == 0
    return tmp_path / "local" / "layer1.zarr"


def test_harvest_train_analyze_on_s3_equal_the_same_run_on_local_files(
    tiny_lm_dir, s3, local_store, tmp_path, capsys
):
    url = f"{s3}/acts/tiny"
    capsys.readouterr()
    assert harvest(tiny_lm_dir, url) == 0
    printed = capsys.readouterr().out
    assert (
        "object storage: free space is not checked" in printed
        and f"wrote {url}/layer1.zarr" in printed
    )

    # Byte for byte: compressed chunks with their crc32c, every zarr.json, harvest_config.json.
    local, remote = tree(local_store), tree(f"{url}/layer1.zarr")
    assert sorted(remote) == sorted(local) and "acts/c/9/0" in remote
    for key in local:
        assert remote[key] == local[key], key  # also zarr.json: a run on S3 is recorded the same
    assert "crc32c" in remote["acts/zarr.json"].decode()

    a, b = ActivationStore(local_store), ActivationStore(f"{url}/layer1.zarr")
    assert b.fingerprint == a.fingerprint and b.describe()["path"] == f"{url}/layer1.zarr"
    for xa, xb, _ in zip(a.batches(64, seed=3), b.batches(64, seed=3), range(12)):
        assert torch.equal(xa, xb)
    for xa, xb in zip(a.heldout_batches(50), b.heldout_batches(50), strict=True):
        assert torch.equal(xa, xb)

    runs_local, runs_s3 = tmp_path / "runs_local", tmp_path / "runs_s3"
    assert (
        main(
            [
                "train",
                "--store",
                str(local_store),
                "--out",
                str(runs_local / "sae/tiny/layer1"),
                *TRAIN,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--store",
                f"{url}/layer1.zarr",
                "--out",
                str(runs_s3 / "sae/tiny/layer1"),
                *TRAIN,
            ]
        )
        == 0
    )
    saes = sorted((runs_local / "sae/tiny/layer1/1x/saes").glob("*/sae.safetensors"))
    assert len(saes) == 2
    for path in saes:
        wa = load_file(str(path))
        wb = load_file(str(runs_s3 / path.relative_to(runs_local)))
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (path.parent.name, k)

    # The report over the S3-trained grid, and the feature browser, which reads the tokens
    # around each top activation from the store the dictionaries recorded: the S3 one.
    assert (
        main(
            [
                "analyze",
                "report",
                "--runs",
                str(runs_s3),
                "--lm",
                "tiny",
                "--layer",
                "1",
                "--wandb",
                "disabled",
                "--no-features",
            ]
        )
        == 0
    )
    assert f"{url}/layer1.zarr" in (runs_s3 / "report/tiny-layer1/index.html").read_text()
    sets = {"local": runs_local / "sae/tiny/layer1/1x", "s3": runs_s3 / "sae/tiny/layer1/1x"}
    for folder in sets.values():
        assert (
            main(
                ["analyze", "features", "--dictionary", str(folder), "--top", "3", "--no-progress"]
            )
            == 0
        )
    pages = {k: sorted((f / "features").glob("*.html")) for k, f in sets.items()}
    assert [p.name for p in pages["s3"]] == [p.name for p in pages["local"]] and pages["s3"]
    # Top-activating contexts, their tokens read from S3, exactly as from the local store.
    assert any("<mark" in p.read_text() for p in pages["s3"])
    for pa, pb in zip(pages["local"], pages["s3"]):
        assert pb.read_text().replace(
            f"{url}/layer1.zarr", str(local_store)
        ) == pa.read_text().replace(str(runs_local), str(runs_s3)), pb.name


KILLABLE = """
import sys, time
from unsuperpose.harvest import stream
real = stream.forward
def slow(*a, **k):
    time.sleep(0.1)
    return real(*a, **k)
stream.forward = slow
from unsuperpose.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_harvest_on_s3_then_resume_equals_uninterrupted(tiny_lm_dir, s3, local_store):
    url = f"{s3}/acts/tiny"
    meta = storage.location(url) / "layer1.zarr" / "zarr.json"
    cmd = [
        sys.executable,
        "-c",
        KILLABLE,
        "harvest",
        "--lm",
        str(tiny_lm_dir),
        "--out",
        url,
        *HARVEST,
    ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def two_chunks() -> bool:
        try:
            return storage.read_json(meta)["attributes"].get("rows_written", 0) >= 2 * 64
        except FileNotFoundError:  # not created yet
            return False

    wait_until(two_chunks, proc, "two chunks written")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    attrs = storage.read_json(meta)["attributes"]
    assert 2 * 64 <= attrs["rows_written"] < 640 and not attrs["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(f"{url}/layer1.zarr")
    assert (
        ActivationStore(f"{url}/layer1.zarr", allow_incomplete=True).rows == attrs["rows_written"]
    )

    assert harvest(tiny_lm_dir, url) == 0
    resumed, straight = tree(f"{url}/layer1.zarr"), tree(local_store)
    assert sorted(resumed) == sorted(straight)
    for key in straight:
        if key != "zarr.json":  # every chunk and array's metadata: byte for byte
            assert resumed[key] == straight[key], key
    # The group's attributes too, but for the list of runs that made it (two here, one there).
    attrs = {
        k: json.loads(t["zarr.json"])["attributes"]
        for k, t in (("resumed", resumed), ("straight", straight))
    }
    assert len(attrs["resumed"].pop("harvest_runs", [None, None])) == 2
    attrs["straight"].pop("harvest_runs", None)
    assert attrs["resumed"] == attrs["straight"]


def test_a_store_left_half_created_on_s3_is_created_anew_and_a_foreign_prefix_refused(
    tiny_lm_dir, s3, local_store, capsys
):
    url = f"{s3}/acts/tiny"
    assert harvest(tiny_lm_dir, url) == 0
    store_url = storage.location(url) / "layer1.zarr"
    fs = storage._filesystem(store_url)
    # What a creation cut short before its last PUT leaves: a group without attributes, the
    # arrays' metadata, and (from the store that was there before) some stray chunks.
    fs.pipe_file(
        (store_url / "zarr.json").key, b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'
    )
    fs.rm((store_url / "acts/c/3/0").key)
    capsys.readouterr()
    assert harvest(tiny_lm_dir, url) == 0
    assert "half-created" in capsys.readouterr().out
    assert tree(store_url) == tree(local_store)

    # Objects that are no part of a store: refused, never deleted.
    other = storage.location(f"{s3}/elsewhere")
    fs.pipe_file((other / "layer1.zarr" / "notes.txt").key, b"mine")
    assert harvest(tiny_lm_dir, str(other)) == 2
    assert "not an activation store" in capsys.readouterr().err
    assert fs.cat_file((other / "layer1.zarr" / "notes.txt").key) == b"mine"


def test_a_corrupt_or_missing_chunk_on_s3_is_named(tiny_lm_dir, s3):
    url = f"{s3}/acts/tiny"
    assert harvest(tiny_lm_dir, url) == 0
    store_url = storage.location(url) / "layer1.zarr"
    fs = storage._filesystem(store_url)
    chunk = fs.cat_file((store_url / "acts/c/2/0").key)
    fs.pipe_file((store_url / "acts/c/2/0").key, chunk[:-5] + bytes([chunk[-5] ^ 1]) + chunk[-4:])
    with pytest.raises(StoreError, match=r"rows 128\.\.192 is corrupt \(crc32c"):
        ActivationStore(store_url).read_rows(128, 192)
    fs.rm((store_url / "heldout/c/4").key)
    with pytest.raises(
        StoreError, match=r"1 chunk\(s\) of heldout are missing \(first: rows from 256\)"
    ):
        ActivationStore(store_url)


def test_no_credentials_no_bucket_no_endpoint_no_s3fs_each_one_clear_error(
    tiny_lm_dir, s3, monkeypatch, capsys, tmp_path
):
    url = f"{s3}/acts/tiny"
    assert harvest(tiny_lm_dir, url) == 0
    before = tree(f"{url}/layer1.zarr")

    def refused(*argv: str) -> str:
        _clear_clients()
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    train = ["train", "--store", f"{url}/layer1.zarr", "--out", str(tmp_path / "sae"), *TRAIN]
    with monkeypatch.context() as m:
        m.delenv("AWS_ACCESS_KEY_ID")
        m.delenv("AWS_SECRET_ACCESS_KEY")
        for argv in (
            ["harvest", "--lm", str(tiny_lm_dir), "--out", url, *HARVEST, "--force"],
            train,
        ):
            err = refused(*argv)
            assert "no AWS credentials" in err and "AWS_ACCESS_KEY_ID" in err
    err = refused(
        "harvest", "--lm", str(tiny_lm_dir), "--out", "s3://no-such-bucket-here/acts", *HARVEST
    )
    assert "bucket 'no-such-bucket-here'" in err and "does not exist" in err
    err = refused(
        "train",
        "--store",
        "s3://no-such-bucket-here/acts/layer1.zarr",
        "--out",
        str(tmp_path),
        *TRAIN,
    )
    assert "does not exist" in err
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
        err = refused("harvest", "--lm", str(tiny_lm_dir), "--out", url, *HARVEST, "--force")
        assert "cannot reach the endpoint" in err and "AWS_ENDPOINT_URL" in err
    with monkeypatch.context() as m:
        import fsspec.registry  # noqa: F401  (the module; the package's attribute is a mapping)

        m.setitem(sys.modules, "s3fs", None)  # as if it were not installed
        m.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
        assert "pip install 'unsuperpose[s3]'" in refused(*train)
    _clear_clients()
    assert tree(f"{url}/layer1.zarr") == before  # nothing was touched on the way
    assert not (tmp_path / "sae").exists()


def test_a_larger_token_cap_appends_to_a_store_on_s3(tiny_lm_dir, s3, local_store):
    """Growing resizes every array on S3 (zarr deletes chunks only when shrinking) and rewrites
    none of the chunks already there."""
    url = f"{s3}/acts/tiny"
    assert harvest(tiny_lm_dir, url, "--tokens", "300") == 0  # after HARVEST's 640: it wins
    store_url = storage.location(url) / "layer1.zarr"
    first = tree(store_url)["acts/c/0/0"]
    assert harvest(tiny_lm_dir, url) == 0  # 640 tokens: grows the store
    grown, straight = tree(store_url), tree(local_store)
    assert grown["acts/c/0/0"] == first and sorted(grown) == sorted(straight)
    for key in straight:
        if key != "zarr.json":
            assert grown[key] == straight[key], key


@pytest.mark.torchrun
def test_two_torchrun_ranks_write_one_store_on_s3_equal_to_one_local_process(
    tiny_lm_dir, s3, local_store
):
    """Rank 0 creates the store and records progress, both ranks write their own chunks: nothing
    in the storage layer may assume one process (no cached listings, no local-only paths)."""
    url = f"{s3}/acts/tiny"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "unsuperpose",
        "harvest",
        "--lm",
        str(tiny_lm_dir),
        "--out",
        url,
        *HARVEST,
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 (cpu) ran" in done.stdout
    two, one = tree(f"{url}/layer1.zarr"), tree(local_store)
    assert sorted(two) == sorted(one)
    for key in one:
        if key != "zarr.json":
            assert two[key] == one[key], key
    attrs = json.loads(two["zarr.json"])["attributes"]
    assert attrs["world_size"] == 2 and attrs["complete"] and attrs["rows_written"] == 640
