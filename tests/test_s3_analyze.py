"""Run folders on S3 after training: `analyze report|features|splice` read them from `s3://`
and write there, and a run's mirror copies up only what changed (test_s3's moto server).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from test_s3 import moto_server, s3, tree  # noqa: E402,F401 (the fixtures, shared)
from unsuperpose import storage  # noqa: E402
from unsuperpose.analyze.remote import wanted  # noqa: E402
from unsuperpose.cli import main  # noqa: E402
from unsuperpose.train.grid import run_mirror  # noqa: E402

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UNSUPERPOSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path / "cache"


@pytest.fixture
def runs_url(s3, analyze_runs) -> str:
    """The analyze runs tree (but its store, read where the dictionaries recorded it) on S3."""
    url = storage.location(f"{s3}/runs")
    files = [f for f in storage.list_files(analyze_runs) if not f.startswith("acts/")]
    storage.upload_tree(analyze_runs, url, files)
    return str(url)


def test_what_a_read_copy_holds():
    assert wanted("sae/tiny/layer1/1x/saes/n64-l1_0.001/config.json")
    assert wanted("sae/tiny/layer1/2x/checkpoint/state.json")
    assert not wanted("sae/tiny/layer1/2x/checkpoint/weights.safetensors")
    assert not wanted("sae/tiny/layer1/2x/checkpoint.tmp/state.json")
    assert not wanted("toy/wandb/run/files/x.json")
    assert not wanted("sae/tiny/layer1/1x/figures/dead.png")


@pytest.mark.slow
def test_report_reads_runs_on_s3_and_writes_its_folder_there(runs_url, cache, capsys):
    out = f"{runs_url}/report/tiny-layer1"
    capsys.readouterr()
    argv = ["analyze", "report", "--runs", runs_url, "--lm", "tiny", "--layer", "1"]
    code = main(argv + ["--out", out, "--no-features", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"report: {out}/index.html" in printed and str(cache) not in printed
    got = tree(out)
    assert {"index.html", "diagnosis.json", "lm_grid.csv"} <= set(got)
    assert any(k.startswith("figures/") and k.endswith(".png") for k in got)
    html = got["index.html"].decode()
    assert f"--runs {runs_url}" in html and str(cache) not in html
    record = storage.read_json(storage.location(out) / "diagnosis.json")
    assert record["toy"] is not None  # the toy run was read from the bucket too
    assert all(s.startswith(f"{runs_url}/sae/tiny/layer1/") for s in record["sets"])
    # Nothing left behind locally but the (empty) cache roots.
    assert not [p for p in cache.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_report_on_s3_by_default_goes_under_the_runs_url(runs_url, cache, capsys):
    argv = ["analyze", "report", "--runs", runs_url, "--lm", "tiny", "--layer", "1"]
    assert main(argv + ["--no-features", "--no-progress"]) == 0
    assert storage.exists(storage.location(f"{runs_url}/report/tiny-layer1/index.html"))


def test_report_names_the_url_when_it_holds_no_grid(s3, cache, capsys):
    url = f"{s3}/empty"
    storage.write_text(storage.location(f"{url}/toy/x.txt"), "x")
    argv = ["analyze", "report", "--runs", url, "--lm", "tiny", "--layer", "1", "--no-features"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert url in err and str(cache) not in err


@pytest.mark.slow
def test_features_reads_a_dictionary_on_s3_and_writes_the_browser_beside_it(
    runs_url, cache, capsys
):
    sets = storage.location(f"{runs_url}/sae/tiny/layer1")
    sae = sorted(f for f in storage.list_files(sets) if f.endswith("/config.json"))[0]
    dict_url = f"{sets}/{sae.rsplit('/', 1)[0]}"
    capsys.readouterr()
    argv = ["analyze", "features", "--dictionary", dict_url, "--top", "3", "--no-progress"]
    assert main(argv + ["--max-rows", "256", "--no-neurons"]) == 0
    printed = capsys.readouterr().out
    assert f"feature browser: {dict_url}/features/index.html" in printed
    got = tree(f"{dict_url}/features")
    assert "index.html" in got and str(cache) not in got["index.html"].decode()


@pytest.mark.slow
def test_splice_reads_a_dictionary_set_on_s3_and_writes_its_json_beside_it(runs_url, cache, capsys):
    grid = f"{runs_url}/sae/tiny/layer1/1x+2x"
    capsys.readouterr()
    argv = ["analyze", "splice", "--dictionary", grid, "--tokens", "100", "--no-progress"]
    assert main(argv) == 0
    assert f"wrote {grid}/splice.json" in capsys.readouterr().out
    rec = storage.read_json(storage.location(f"{grid}/splice.json"))
    assert len(rec["saes"]) == 4
    assert all(p.startswith(f"{grid}/saes/") for p in rec["dictionaries"].values())


class Puts:
    """storage.upload_tree, counting the files each call sends."""

    def __init__(self, monkeypatch):
        self.sent: list[str] = []
        real = storage.upload_tree

        def upload(local, remote, files=None):
            self.sent += list(storage.list_files(local) if files is None else files)
            return real(local, remote, files)

        monkeypatch.setattr(storage, "upload_tree", upload)


def test_the_mirror_sends_only_what_changed_and_deletes_what_the_run_removed(
    s3, cache, monkeypatch
):
    url = storage.location(f"{s3}/runs/toy")
    storage.write_text(url / "theirs.txt", "not the run's")  # never the mirror's: left alone
    mirror = run_mirror(url)
    mirror.pull()
    (mirror.folder / "checkpoint").mkdir()
    for name, text in {"a.txt": "a", "b.txt": "b", "checkpoint/state.json": "{}"}.items():
        (mirror.folder / name).write_text(text)
    (mirror.folder / "checkpoint/w.bin").write_bytes(b"1" * 100)
    puts = Puts(monkeypatch)
    mirror.upload_checkpoint()
    assert sorted(puts.sent) == ["a.txt", "b.txt", "checkpoint/state.json", "checkpoint/w.bin"]
    assert puts.sent[-1] == "checkpoint/state.json"  # copied last

    puts.sent.clear()
    (mirror.folder / "a.txt").write_text("A")  # same size, other bytes
    (mirror.folder / "b.txt").unlink()
    mirror.upload_checkpoint()
    assert puts.sent == ["a.txt", "checkpoint/state.json"]
    assert set(storage.list_files(url)) == {
        "a.txt",
        "theirs.txt",
        "checkpoint/state.json",
        "checkpoint/w.bin",
    }
    assert storage.read_text(url / "a.txt") == "A"

    puts.sent.clear()
    (mirror.folder / "c.txt").write_text("c")
    for f in (mirror.folder / "checkpoint").iterdir():
        f.unlink()
    (mirror.folder / "checkpoint").rmdir()
    mirror.push()
    assert puts.sent == ["c.txt"]
    assert set(storage.list_files(url)) == {"a.txt", "c.txt", "theirs.txt"}

    # A mirror pulled again knows what the URL holds: nothing to send.
    (mirror.folder / "checkpoint").mkdir()
    mirror2 = run_mirror(url)
    mirror2.pull()
    puts.sent.clear()
    mirror2.push()
    assert puts.sent == []
