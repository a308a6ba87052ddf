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
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from unsuperpose import faults
from unsuperpose.cli import EXIT_IO, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
            raise OSError(self.err, os.strerror(self.err), os.fspath(file))
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


@pytest.mark.parametrize("n", [12, 45, 70])  # creating the store; after 2 chunks; after 6
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
    assert (
        "not started" if kept == 0 and n < 20 else f"layer1.zarr {kept:,} of 1,024 rows"
    ) in line
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
        "--dict",
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
        "it is not whole, so it is not resumed from; add --force to start over (or restore it "
        "from a copy)"
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
        "--G",
        "32",
        "--k",
        "2",
        "--steps",
        "40",
        "--batch-size",
        "64",
        "--l1",
        "1e-3,1e-2",
        "--dict-ratios",
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
