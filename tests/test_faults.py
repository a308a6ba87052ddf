"""Faults in the middle of a write: one line, nothing lost, and a rerun equal to an undisturbed run.

Disk faults are injected deterministically: ``BadDisk`` wraps every file opened for writing
under a folder (``io.open``, which ``open``, ``pathlib`` and ``os.fdopen`` all go through, and
safetensors' ``save_file``, which writes from Rust) and, from the N-th write of a file whose path
matches a pattern on, fails every write there as a disk that has filled up would: half of the
data lands, then ``OSError(ENOSPC)`` with no file name. Permission denied and a read-only file
system fail at ``open``, with the file name, as the kernel does.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
import re
import signal
import time
import types
from pathlib import Path

import numpy as np
import pytest
import zarr

from unsuperpose import faults, lock_holder
from unsuperpose.cli import EXIT_IO, main


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread_throughout():
    """One torch thread for the module's fixtures as well as its tests. A fixture scoped to the
    module (``harvested``, ``trained``, ``report``, ``local_s3_reference``: the undisturbed runs
    a rerun must equal) is set up before any fixture scoped to the test, so under the
    per-test ``one_torch_thread`` it ran on the process's threads while the disturbed run and
    its rerun ran on one; runs on different threads round differently (the library's bit for
    bit holds at the same threads), and the grids' history.jsonl and weights differed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BadDisk:
    """Writes under ``root`` fail from the ``n``-th write of a file whose path matches ``when``
    (a regular expression) on: every write, of any file there, once it has begun."""

    def __init__(
        self, root: Path, n: int = 1, when: str = "", err: int = errno.ENOSPC, per: str = "write"
    ):
        """``per="file"``: the n-th matching file opened for writing, not the n-th write (one
        torch.save is many writes)."""
        self.root, self.n, self.when, self.err = str(Path(root).resolve()), n, when, err
        self.per = per
        self.seen = 0  # writes (or files) of matching files so far
        self.failed = 0
        self.broken = False
        self._open = io.open

    def install(self, monkeypatch) -> BadDisk:
        monkeypatch.setattr(io, "open", self.open)
        monkeypatch.setattr(builtins, "open", self.open)
        from unsuperpose.train import checkpoint

        real = checkpoint.save_file

        def save_file(tensors, filename, *a, **kw):
            if self._ours(filename):
                self._tick(filename, opening=self.per == "file")
                if self.broken:
                    Path(filename).write_bytes(b"\0" * 64)  # a file cut short by the fault
                    from safetensors import SafetensorError

                    self.failed += 1
                    raise SafetensorError(
                        "Error while serializing: I/O error: No space left on device (os error 28)"
                    )
            return real(tensors, filename, *a, **kw)

        monkeypatch.setattr(checkpoint, "save_file", save_file)
        return self

    def _ours(self, name) -> bool:
        if isinstance(name, int):
            try:
                name = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                return False
        return os.path.abspath(os.fspath(name)).startswith(self.root + os.sep)

    def _tick(self, name, opening: bool = False) -> None:
        if opening != (self.per == "file"):
            return
        if isinstance(name, int):
            name = os.readlink(f"/proc/self/fd/{name}")
        if re.search(self.when, os.fspath(name)):
            self.seen += 1
            if self.seen >= self.n:
                self.broken = True

    def open(self, file, mode="r", *args, **kw):
        writing = any(c in mode for c in "wax+")
        if writing and self.err != errno.ENOSPC and self._ours(file) and self._matches(file):
            self.failed += 1
            name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else file
            raise OSError(self.err, os.strerror(self.err), os.fspath(name))
        fh = self._open(file, mode, *args, **kw)
        if writing and self.err == errno.ENOSPC and self._ours(file):
            self._tick(file if not isinstance(file, int) else fh.name, opening=True)
            return _Faulty(fh, self, file if not isinstance(file, int) else fh.name)
        return fh

    def _matches(self, name) -> bool:
        """For faults at open: the n-th open of a matching file on."""
        self._tick(name, opening=self.per == "file")
        return self.broken


class _Faulty:
    """A file whose writes go through ``BadDisk``."""

    def __init__(self, fh, disk: BadDisk, name):
        self._fh, self._disk, self._name = fh, disk, name

    def write(self, data):
        self._disk._tick(self._name)
        if self._disk.broken:
            self._disk.failed += 1
            self._fh.write(data[: len(data) // 2])  # the disk took part of it
            self._fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __iter__(self):
        return iter(self._fh)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


def one_line(err: str) -> str:
    """The error output, checked to be one line without a traceback (progress bars of the
    libraries that load the model aside)."""
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


# -- the classifier --------------------------------------------------------------------------


def test_classify_finds_the_fault_anywhere_in_the_chain():
    disk = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise disk
        except OSError as exc:
            raise RuntimeError("writing file:///x/layer1.zarr failed") from exc
    except RuntimeError as wrapped:
        faults.mark(disk, "/x/layer1.zarr")
        fault = faults.classify(wrapped)
    assert (fault.kind, fault.path) == ("disk-full", "/x/layer1.zarr")
    # safetensors says it only in words
    from safetensors import SafetensorError

    rust = SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )
    assert faults.classify(rust).kind == "disk-full"
    assert faults.classify(PermissionError(errno.EACCES, "denied", "/a")).path == "/a"
    assert faults.classify(OSError(errno.EROFS, "Read-only file system")).kind == "read-only"
    # not faults: a bug, a missing file (bad input, said elsewhere), Ctrl-C
    assert faults.classify(ValueError("bug")) is None
    assert faults.classify(FileNotFoundError(errno.ENOENT, "No such file")) is None
    assert faults.classify(KeyboardInterrupt()) is None


def test_classify_reads_the_object_stores_answer_before_s3fs_translation():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def answer(code: str, s: int) -> OSError:
        boto = ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": s},
            },
            "PutObject",
        )
        translated = PermissionError("m") if s == 403 else OSError(errno.EIO, "m")
        translated.__cause__ = boto  # as s3fs.errors.translate_boto_error does
        return translated

    assert faults.classify(answer("ServiceUnavailable", 503)).kind == "refusing"
    assert faults.classify(answer("InternalError", 500)).kind == "refusing"
    assert faults.classify(answer("InvalidAccessKeyId", 403)).kind == "credentials"
    assert faults.classify(answer("AccessDenied", 403)).kind == "denied"
    assert faults.classify(answer("NoSuchBucket", 404)) is None  # bad input, not a fault
    down = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert faults.classify(down).kind == "unreachable"


# -- harvest ---------------------------------------------------------------------------------


def harvest_args(lm_dir, out) -> list[str]:
    return [
        "harvest",
        "--lm",
        str(lm_dir),
        "--layer",
        "1",
        "--out",
        str(out),
        "--tokens",
        "1024",
        "--chunk-rows",
        "128",
        "--batch-size",
        "2",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def harvested(tiny_lm_dir, tmp_path_factory):
    """An undisturbed harvest: what every disturbed one must equal once rerun."""
    out = tmp_path_factory.mktemp("undisturbed") / "acts"
    assert main(harvest_args(tiny_lm_dir, out)) == 0
    return out / "layer1.zarr"


def assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ("acts", "tokens", "positions", "heldout"):
        np.testing.assert_array_equal(ga[name][:].view(np.uint8), gb[name][:].view(np.uint8))
    keep = ("rows_written", "rows_planned", "complete", "weights_sha256", "corpus_fingerprint")
    assert {k: ga.attrs[k] for k in keep} == {k: gb.attrs[k] for k in keep}


def assert_kept_rows_are_whole(store: Path, reference: Path) -> int:
    """The rows a faulted store says it holds are whole chunks, equal to the undisturbed
    store's; no temporary file of a chunk write is left. Returns how many rows it kept."""
    if not (store / "zarr.json").exists():
        return 0
    g, ref = zarr.open_group(store, mode="r"), zarr.open_group(reference, mode="r")
    kept = g.attrs["rows_written"]
    assert kept % g.attrs["chunk_rows"] == 0
    for name in ("acts", "tokens", "positions", "heldout"):
        np.testing.assert_array_equal(
            g[name][:kept].view(np.uint8), ref[name][:kept].view(np.uint8)
        )
    assert not list(store.rglob("*.partial"))
    return kept


@pytest.mark.parametrize("n", [5, 20, 40])  # creating the store; after 1 chunk; after 5
def test_harvest_on_a_disk_that_fills_up(n, tiny_lm_dir, harvested, tmp_path, monkeypatch, capsys):
    out = tmp_path / "acts"
    args = harvest_args(tiny_lm_dir, out)
    with monkeypatch.context() as m:
        disk = BadDisk(out, n=n).install(m)
        assert main(args) == EXIT_IO
    assert disk.failed >= 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"unsuperpose harvest: error: the disk is full at {out}")
    kept = assert_kept_rows_are_whole(out / "layer1.zarr", harvested)
    started = (out / "layer1.zarr").exists()
    assert (f"layer1.zarr {kept:,} of 1,024 rows" if started else "not started") in line
    assert line.endswith(f"then run `unsuperpose {' '.join(args[:-1])} --no-progress` again")
    assert main(args) == 0  # the disk has room again
    assert_same_store(out / "layer1.zarr", harvested)


@pytest.mark.parametrize(
    "err, cause",
    [(errno.EACCES, "permission denied"), (errno.EROFS, "the file system is read-only")],
)
def test_harvest_into_a_folder_it_may_not_write(
    err, cause, tiny_lm_dir, harvested, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "acts"
    args = harvest_args(tiny_lm_dir, out)
    with monkeypatch.context() as m:
        BadDisk(out, err=err).install(m)
        assert main([*args, "--debug"]) == EXIT_IO  # --debug: the traceback, then the line
    err_text = capsys.readouterr().err
    assert "Traceback" in err_text
    line = err_text.strip().splitlines()[-1]
    assert line.startswith(f"unsuperpose harvest: error: {cause} at {out}/")
    assert "make it writable" in line or "make that file system writable" in line
    assert "--debug" not in line  # the command to rerun is the command, not the debugging
    assert main(args) == 0
    assert_same_store(out / "layer1.zarr", harvested)


# -- train: a grid's checkpoints and its final save ------------------------------------------


def train_args(store: Path, out: Path) -> list[str]:
    return [
        "train",
        "--store",
        str(store),
        "--out",
        str(out),
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
        "--checkpoint-every",
        "10",
        "--splice-tokens",
        "0",
        "--wandb",
        "disabled",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def trained(harvested, tmp_path_factory):
    out = tmp_path_factory.mktemp("undisturbed-grid")
    assert main(train_args(harvested, out)) == 0
    return out / "1x+2x"


CKPT = r"/checkpoint\.tmp/"  # the files of a checkpoint being written
# Files that say when or how fast, not what was computed.
_NOT_RESULTS = {"log.jsonl"}


def files_under(root: Path, skip: set[str] = frozenset()) -> list[str]:
    found = (p for p in root.rglob("*") if p.is_file() and p.name not in skip)
    return sorted(p.relative_to(root).as_posix() for p in found)


def assert_same_grid(a: Path, b: Path) -> None:
    files = files_under(a, _NOT_RESULTS)
    assert files == files_under(b, _NOT_RESULTS)
    assert "checkpoint/state.json" not in files  # a finished grid keeps no checkpoint
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.mark.parametrize(
    "n, when, kept",
    [
        (3, CKPT, "the checkpoint at step 10 of 40"),  # the 2nd checkpoint's weights
        (4, CKPT, "the checkpoint at step 10 of 40"),  # the 2nd checkpoint's state.json
        (1, "saes/", "the checkpoint at step 40 of 40"),  # the final save
        (2, "summary.csv|figures/", "the checkpoint at step 40 of 40"),  # the end of it
        (1, "saelens/", "the checkpoint at step 40 of 40"),  # the SAELens export
    ],
)
def test_training_on_a_disk_that_fills_up(
    n, when, kept, harvested, trained, tmp_path, monkeypatch, capsys
):
    args = train_args(harvested, tmp_path)
    out = tmp_path / "1x+2x"
    with monkeypatch.context() as m:
        disk = BadDisk(out, n=n, when=when).install(m)
        assert main(args) == EXIT_IO
    assert disk.failed >= 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"unsuperpose train: error: the disk is full at {out}/")
    assert f"kept: {kept} in {out}/checkpoint; the rerun resumes there" in line
    # nothing half written is left where a rerun would read it
    assert not (out / "checkpoint.tmp").exists() and not list(out.rglob(".*.tmp"))
    assert main(args) == 0
    assert f"resuming from the checkpoint at step {kept.split()[4]}" in capsys.readouterr().out
    assert_same_grid(out, trained)


def test_a_checkpoint_cut_short_is_never_resumed(harvested, trained, tmp_path, monkeypatch, capsys):
    args = train_args(harvested, tmp_path)
    out = tmp_path / "1x+2x"
    with monkeypatch.context() as m:
        BadDisk(out, n=3, when=CKPT).install(m)
        assert main(args) == EXIT_IO  # leaves the checkpoint of step 10
    weights = out / "checkpoint" / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # as a copy or a disk that lost its tail
    capsys.readouterr()
    assert main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert line == (
        f"unsuperpose train: error: the checkpoint {out}/checkpoint: state.safetensors has "
        f"{weights.stat().st_size:,} bytes, not the {weights.stat().st_size + 100:,} written: "
        "it is not whole, so it is not resumed from; start over with --force, or restore it "
        "from a copy"
    )
    assert main([*args, "--force"]) == 0
    assert_same_grid(out, trained)


# -- W&B: a copy for convenience, never the end of a run ---------------------------------------


class _FullWandbRun:
    """A W&B run whose files are on a full disk: it fails from its ``n``-th log call on."""

    id = "fullrun1"

    def __init__(self, n: int):
        self.n, self.calls, self.finished = n, 0, False
        self.summary = self

    def log(self, *args, **kw):
        self.calls += 1
        if self.calls >= self.n:
            raise OSError(errno.ENOSPC, "No space left on device", "wandb/run-x/run-x.wandb")

    def update(self, values):
        raise AssertionError("W&B is no longer called once it has failed")

    def finish(self, exit_code=None, quiet=None):
        self.finished = True


@pytest.mark.parametrize("at", ["init", "log"])
def test_a_full_disk_under_wandb_warns_and_training_goes_on(
    at, harvested, trained, tmp_path, monkeypatch, capsys
):
    import wandb

    run = _FullWandbRun(n=2)

    def init(**kw):
        if at == "init":
            raise OSError(errno.ENOSPC, "No space left on device")
        return run

    monkeypatch.setattr(wandb, "init", init)
    args = [a if a != "disabled" else "offline" for a in train_args(harvested, tmp_path)]
    assert main(args) == 0
    err = capsys.readouterr().err
    where = "wandb/run-x/run-x.wandb" if at == "log" else f"{tmp_path / '1x+2x' / 'wandb'}"
    assert one_line(err) == (
        f"unsuperpose: warning: W&B stopped: the disk is full at {where}; the run goes on, "
        f"logging to {tmp_path / '1x+2x' / 'log.jsonl'} alone"
    )
    assert at == "init" or (run.finished and run.calls == 2)
    (tmp_path / "1x+2x" / "wandb_run_id").unlink(missing_ok=True)
    assert_same_grid(tmp_path / "1x+2x", trained)


# -- analyze, lm, toy ------------------------------------------------------------------------


def report_args(runs: Path, out: Path) -> list[str]:
    return [
        "analyze",
        "report",
        "--runs",
        str(runs),
        "--lm",
        "tiny",
        "--layer",
        "1",
        "--out",
        str(out),
        "--no-progress",
        "--top",
        "5",
    ]


def same_files(a: Path, b: Path, differ=lambda rel, x, y: x == y) -> None:
    assert files_under(a) == files_under(b)
    for rel in files_under(a):
        assert differ(rel, (a / rel).read_bytes(), (b / rel).read_bytes()), rel


@pytest.fixture(scope="module")
def report(analyze_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("undisturbed-report")
    assert main(report_args(analyze_runs, out)) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 9])  # the first figures; the feature browser's pages
def test_a_report_on_a_disk_that_fills_up(n, analyze_runs, report, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    args = report_args(analyze_runs, out)
    with monkeypatch.context() as m:
        disk = BadDisk(out, n=n).install(m)
        assert main(args) == EXIT_IO
    assert disk.failed >= 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"unsuperpose analyze: error: the disk is full at {out}/")
    assert f"kept: every run it reads, unchanged (analysis only reads them); of {out}, " in line
    assert not list(out.rglob(".*.tmp"))  # only whole files are left
    assert main(args) == 0
    # the pages name their own folder; everything else is byte for byte the same
    same_files(
        out, report, lambda rel, x, y: x.replace(str(out).encode(), str(report).encode()) == y
    )


def lm_args(corpus: str, out: Path, cache: Path) -> list[str]:
    return [
        "lm",
        "train",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--n-layer",
        "1",
        "--d-model",
        "8",
        "--n-head",
        "2",
        "--d-mlp",
        "16",
        "--n-ctx",
        "16",
        "--tokens",
        "512",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--checkpoint-every",
        "2",
        "--corpus",
        corpus,
        "--val-fraction",
        "0.2",
        "--token-cache",
        str(cache),
        "--threads",
        "1",
        "--wandb",
        "disabled",
        "--no-progress",
    ]


@pytest.mark.parametrize("n, when", [(2, r"checkpoint\.pt"), (1, r"\.saving-")])  # 2nd ckpt; end
def test_lm_training_on_a_disk_that_fills_up(n, when, tiny_corpus, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    undisturbed = tmp_path / "undisturbed"
    assert main(lm_args(tiny_corpus.corpus, undisturbed, cache)) == 0
    out = tmp_path / "lm"
    args = lm_args(tiny_corpus.corpus, out, cache)
    capsys.readouterr()
    with monkeypatch.context() as m:
        disk = BadDisk(out, n=n, when=when, per="file").install(m)
        assert main(args) == EXIT_IO
    assert disk.failed >= 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"unsuperpose lm: error: the disk is full at {out}")
    assert (
        f"kept: the last checkpoint, {out}/checkpoint.pt (written whole); the rerun resumes" in line
    )
    assert not (out / "model.safetensors").exists()  # a model folder is whole or not a model
    assert main(args) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (undisturbed / name).read_bytes(), name


def toy_args(out: Path) -> list[str]:
    return [
        "toy",
        "--out",
        str(out),
        "--h",
        "16",
        "--g",
        "32",
        "--k",
        "2",
        "--steps",
        "40",
        "--batch-size",
        "64",
        "--l1",
        "1e-3,1e-2",
        "--dict-sizes",
        "1x,2x",
        "--eval-every",
        "20",
        "--checkpoint-every",
        "10",
        "--wandb",
        "disabled",
        "--no-progress",
    ]


def test_a_toy_grid_on_a_disk_that_fills_up(tmp_path, monkeypatch, capsys):
    undisturbed = tmp_path / "undisturbed"
    assert main(toy_args(undisturbed)) == 0
    out = tmp_path / "toy"
    with monkeypatch.context() as m:
        BadDisk(out, n=5, when=CKPT).install(m)  # the third checkpoint's weights
        assert main(toy_args(out)) == EXIT_IO
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"unsuperpose toy: error: the disk is full at {out}/checkpoint.tmp; ")
    assert f"kept: the checkpoint at step 20 of 40 in {out}/checkpoint; the rerun resumes" in line
    assert main(toy_args(out)) == 0
    assert_same_grid(out, undisturbed)


# -- object storage: an endpoint that stalls, fails or drops connections for a while ----------

S3_SETTINGS = {"UNSUPERPOSE_S3_TRIES": "8", "UNSUPERPOSE_S3_READ_TIMEOUT": "2"}  # 9.8 s of waits


class FlakyEndpoint:
    """An HTTP proxy on 127.0.0.1 in front of the moto server that, when told, answers every
    request with an HTTP error (``fail``), drops its connection unanswered (``drop``) or holds it
    (``stall``) until ``heal``; otherwise it passes requests through."""

    def __init__(self, upstream: str):
        import http.client
        import http.server
        import threading
        import urllib.parse

        self.mode, self.status, self.after = "pass", 0, 0
        self.for_s, self.until = float("inf"), None
        self.hook, self.hook_after = None, 0  # see ``at``
        self.trigger = None  # see ``after_request``
        self.faulted = 0  # requests answered with a fault
        self.passed = 0
        self.healed = threading.Event()
        self.healed.set()
        flaky = self
        host = urllib.parse.urlparse(upstream)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _handle(self):
                body = self._body()
                flaky.hook_after -= 1
                if flaky.hook_after == 0:
                    flaky.hook()
                if flaky.mode != "pass" and flaky.after <= 0 and flaky.until is None:
                    flaky.until = time.monotonic() + flaky.for_s
                if flaky.until is not None and time.monotonic() > flaky.until:
                    flaky.heal()
                if flaky.mode != "pass" and flaky.after <= 0:
                    flaky.faulted += 1
                    if flaky.mode == "stall":
                        flaky.healed.wait(120)
                    elif flaky.mode == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    else:
                        text = b"<Error><Code>%s</Code><Message>flaky</Message></Error>" % (
                            b"ServiceUnavailable" if flaky.status == 503 else b"InternalError"
                        )
                        self.send_response(flaky.status)
                        self.send_header("Content-Length", str(len(text)))
                        self.end_headers()
                        if self.command != "HEAD":  # a HEAD answer has no body
                            self.wfile.write(text)
                        return
                flaky.after -= 1
                flaky.passed += 1
                then = None
                if flaky.trigger is not None and flaky.trigger[0](self.command, self.path):
                    then, flaky.trigger = flaky.trigger[1], None
                conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"
                }
                if body or "Content-Length" in self.headers:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                if then is not None:
                    then()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fault(
        self, mode: str, status: int = 503, after: int = 0, for_s: float = float("inf")
    ) -> None:
        """From the ``after``-th next request on, for ``for_s`` seconds, every request meets
        ``mode``."""
        self.healed.clear() if mode == "stall" else self.healed.set()
        self.status, self.after, self.for_s, self.until = status, after, for_s, None
        self.mode = mode

    def at(self, after: int, hook) -> None:
        """Call ``hook()`` when the ``after``-th next request arrives (passed through as usual)."""
        self.hook, self.hook_after = hook, after

    def after_request(self, matches, then) -> None:
        """Once a request ``matches(method, path)`` has been answered, call ``then()``."""
        self.trigger = (matches, then)

    def heal(self) -> None:
        self.mode, self.until = "pass", None
        self.healed.set()

    def close(self) -> None:
        self.heal()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """A moto server of this module's own (its tests pause it): (url, process)."""
    import subprocess
    import sys
    import time
    import urllib.request

    from test_s3 import _free_port

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
    yield url, proc
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3(moto, monkeypatch, request):
    """test_s3's ``s3`` on this module's server (imported here: without s3fs and moto only the
    object-storage tests are skipped): a fresh bucket's URL, the AWS environment pointing at it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import test_s3

    # Its bucket is named after the test, cut to 40 characters: parametrized ones would share.
    unique = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    named = types.SimpleNamespace(node=types.SimpleNamespace(name=f"faults-{unique}"))
    yield from test_s3.s3.__wrapped__(moto[0], monkeypatch, named)


@pytest.fixture
def flaky(s3, moto, monkeypatch):
    """The run's endpoint is a FlakyEndpoint in front of the bucket's server, and the retry
    budget a few seconds (S3_SETTINGS)."""
    from test_s3 import _clear_clients

    proxy = FlakyEndpoint(moto[0])
    for k, v in S3_SETTINGS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    _clear_clients()
    yield proxy
    proxy.close()
    _clear_clients()


def assert_same_s3_store(url: str, local: Path) -> None:
    """Byte for byte, but for the group's list of the runs that made it (a rerun adds one)."""
    import json

    from test_s3 import tree

    remote, straight = tree(url), tree(local)
    assert sorted(remote) == sorted(straight)
    for key in straight:
        if key != "zarr.json":  # every chunk and array's metadata
            assert remote[key] == straight[key], key
    a, b = (json.loads(t["zarr.json"])["attributes"] for t in (remote, straight))
    a.pop("harvest_runs"), b.pop("harvest_runs")
    assert a == b


def s3_harvest_args(lm_dir, out: str) -> list[str]:
    from test_s3 import HARVEST

    return ["harvest", "--lm", str(lm_dir), "--out", out, *HARVEST]


@pytest.fixture(scope="module")
def local_s3_reference(tiny_lm_dir, tmp_path_factory):
    """test_s3's harvest on local files: what every store on the flaky endpoint must equal."""
    out = tmp_path_factory.mktemp("local-reference")
    assert main(s3_harvest_args(tiny_lm_dir, str(out))) == 0
    return out / "layer1.zarr"


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize("mode, status", [("fail", 503), ("fail", 500), ("drop", 0), ("stall", 0)])
def test_an_outage_within_the_retry_budget_is_ridden_out(
    mode, status, flaky, s3, tiny_lm_dir, local_s3_reference, capsys
):
    from test_s3 import tree

    url = f"{s3}/acts/tiny"
    flaky.fault(mode, status, after=60, for_s=2.5)  # mid-harvest, shorter than 9.8 s of waits
    assert main(s3_harvest_args(tiny_lm_dir, url)) == 0
    assert flaky.faulted > 0 and "error" not in capsys.readouterr().err
    assert tree(f"{url}/layer1.zarr") == tree(local_s3_reference)


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, status, cause",
    [
        ("fail", 500, "the object store kept failing (HTTP 500 InternalError)"),
        ("fail", 503, "the object store kept failing (HTTP 503 ServiceUnavailable)"),
        ("drop", 0, "the object store could not be reached"),
    ],
)
def test_an_outage_longer_than_the_retry_budget_is_one_line_and_the_rerun_completes(
    mode, status, cause, flaky, s3, tiny_lm_dir, local_s3_reference, monkeypatch, capsys
):

    monkeypatch.setenv("UNSUPERPOSE_S3_TRIES", "3")  # 0.56 s of waits
    url = f"{s3}/acts/tiny"
    args = s3_harvest_args(tiny_lm_dir, url)
    flaky.fault(mode, status, after=60)
    assert main(args) == EXIT_IO
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"unsuperpose harvest: error: {cause} at {url}"), line
    assert line.endswith(
        f"once the object store answers again, run `unsuperpose {' '.join(args)}` again"
    )
    assert f"kept: in each store under {url}, the rows its zarr.json records as written" in line
    flaky.heal()
    # Its lease could not be deleted in the outage; a rerun takes over the lease of a run that
    # ended on this machine at once. The rerun here is this same process: say it has ended.
    from unsuperpose import lock_holder

    monkeypatch.setattr(lock_holder, "pid_runs", lambda pid: pid != os.getpid())
    assert main(args) == 0
    assert "took over the lock" in capsys.readouterr().err
    assert_same_s3_store(f"{url}/layer1.zarr", local_s3_reference)


@pytest.mark.s3
@pytest.mark.slow
def test_the_object_store_paused_mid_harvest_then_resumed(
    flaky, moto, s3, tiny_lm_dir, local_s3_reference
):
    """The moto server itself stopped (SIGSTOP) for 3 s and continued: every request in flight
    times out (2 s) and is tried again until it answers."""
    import threading

    from test_s3 import tree

    pid = moto[1].pid

    def pause():
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(3, os.kill, (pid, signal.SIGCONT)).start()

    flaky.at(60, pause)  # the proxy only passes requests on; the server is what stops
    url = f"{s3}/acts/tiny"
    assert main(s3_harvest_args(tiny_lm_dir, url)) == 0
    assert tree(f"{url}/layer1.zarr") == tree(local_s3_reference)


@pytest.mark.s3
def test_a_holder_cut_off_longer_than_its_lease_stops_before_another_run_takes_over(
    flaky, moto, s3, monkeypatch, capsys
):
    """Run A reaches the store through an endpoint that hangs; run B, elsewhere, reaches it
    directly. A must give its lease up before B can take it over, and A's renewals, held in the
    outage and delivered after it, must not take it back: never two writers."""
    from test_s3 import _clear_clients
    from unsuperpose import locking, storage

    out = storage.location(f"{s3}/runs/toy")
    lost_at: list[float] = []
    a = locking.acquire(
        out, lease_s=4, renew_s=0.25, on_lost=lambda: lost_at.append(time.monotonic())
    )
    assert a.attempt_s < 4 - 0.25  # a renewal always ends in time to know
    flaky.fault("stall")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto[0])  # B's own way to the store
    _clear_clients()
    refused = 0
    while True:
        try:
            b = locking.acquire(out, lease_s=4, renew_s=0.25)
            taken_at = time.monotonic()
            break
        except locking.Locked:  # A's lease has not expired yet (A's pid runs: not dead here)
            refused += 1
            time.sleep(0.1)
    assert refused > 0 and lost_at and lost_at[0] < taken_at and a.lost
    assert "took over the lock" in capsys.readouterr().err
    flaky.heal()  # A's held renewals arrive now, late: conditional on A's ETag, they fail
    time.sleep(1)
    assert locking.current_holder(out).token == b.holder.token
    a.release()  # a holder that lost its lease never deletes the new one
    assert locking.current_holder(out).token == b.holder.token
    b.release()
    assert locking.current_holder(out) is None


@pytest.mark.s3
@pytest.mark.slow
def test_a_grid_mirrored_to_s3_through_an_outage_ends_in_one_line_and_resumes(
    flaky, s3, tmp_path, monkeypatch, capsys
):
    """A toy grid whose --out is on S3 (worked in a local mirror, copied up after each
    checkpoint): the store fails for good once the first checkpoint is up; the run stops in one
    line, and the rerun resumes from the bucket's checkpoint and leaves a local run's bytes."""
    from test_s3 import tree
    from unsuperpose import lock_holder

    monkeypatch.setenv("UNSUPERPOSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("UNSUPERPOSE_S3_TRIES", "3")
    local = tmp_path / "local"
    assert main(toy_args(local)) == 0
    url = f"{s3}/runs/toy"
    args = toy_args(url)
    flaky.after_request(
        lambda method, path: method == "PUT" and path.endswith("/checkpoint/state.json"),
        lambda: flaky.fault("fail", 503),
    )
    assert main(args) == EXIT_IO
    line = one_line(capsys.readouterr().err)
    # a HEAD (does state.json exist?) is what fails first: its answer has no body, no code
    assert line.startswith(
        f"unsuperpose toy: error: the object store kept failing (HTTP 503) at {url}/checkpoint/"
    ), line
    assert f"kept: the last checkpoint copied up to {url}/checkpoint whole" in line
    flaky.heal()
    monkeypatch.setattr(lock_holder, "pid_runs", lambda pid: pid != os.getpid())  # a new process
    assert main(args) == 0
    assert "resuming from the checkpoint at step 10 of 40" in capsys.readouterr().out
    remote, mine = tree(url), tree(local)
    assert remote.keys() == mine.keys()
    assert all(remote[k] == mine[k] for k in mine if k != "log.jsonl")


@pytest.mark.s3
@pytest.mark.slow
def test_a_report_on_s3_through_an_outage_ends_in_one_line_and_the_rerun_writes_it_whole(
    flaky, s3, analyze_runs, tmp_path, monkeypatch, capsys
):
    from test_s3 import tree
    from unsuperpose import storage

    monkeypatch.setenv("UNSUPERPOSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("UNSUPERPOSE_S3_TRIES", "3")
    runs = storage.location(f"{s3}/runs")
    files = [f for f in storage.list_files(analyze_runs) if not f.startswith("acts/")]
    storage.upload_tree(analyze_runs, runs, files)
    base = ["analyze", "report", "--runs", str(runs), "--lm", "tiny", "--layer", "1"]
    base += ["--no-features", "--no-progress"]
    undisturbed = f"{runs}/report/undisturbed"
    assert main([*base, "--out", undisturbed]) == 0
    out = f"{runs}/report/tiny-layer1"
    args = [*base, "--out", out]
    flaky.fault("fail", 500, after=20)  # while it reads the runs
    assert main(args) == EXIT_IO
    line = one_line(capsys.readouterr().err)
    assert line.startswith("unsuperpose analyze: error: the object store kept failing (HTTP 500")
    assert f"kept: every run it reads, unchanged (analysis only reads them); of {out}, " in line
    flaky.heal()
    monkeypatch.setattr(lock_holder, "pid_runs", lambda pid: pid != os.getpid())  # a new process
    assert main(args) == 0
    got, want = tree(out), tree(undisturbed)
    assert got.keys() == want.keys()
    for key in set(want) - {"log.jsonl"}:  # the pages name their own folder
        assert got[key].replace(out.encode(), undisturbed.encode()) == want[key], key
