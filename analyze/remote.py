"""Run folders on object storage for the commands that read them after training (`analyze`).

A URL read (``--runs``/``--dict``/``--toy`` s3://...) is copied into a read-only local folder,
``$UNSUPERPOSE_CACHE/runs-read/<hash of the URL>``, holding only what analyze reads (no
checkpoint weights, W&B files, figures or feature browsers), fresh on every command, with the
objects' modification times (the report orders dictionary sets by them). A URL written
(``--out s3://...``) is written in ``$UNSUPERPOSE_CACHE/runs-out/<hash>`` and copied up at the
end. ``Names`` turns the local folders back into their URLs in messages and in the text files
written (the report's page and JSON), so what a user reads names the bucket, not the cache.
Every writer of an analyze output (the report, the methods page, the feature browser) runs
``with copies() as names, names.writing(out, what) as local:``, so each one locks, renames,
uploads and cleans up the same way.
Activation stores recorded by a dictionary are read where they are (harvest reads S3 itself).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from unsuperpose import locking, storage
from unsuperpose.run_folder import cache_folder
from unsuperpose.train.layout import CHECKPOINT_DIR

# Folders analyze never reads: W&B's files, figures and browsers written beside a run.
SKIPPED_FOLDERS = {"wandb", "figures", "features", "report"}
TEXT_SUFFIXES = (".html", ".json", ".csv", ".txt", ".md")


def wanted(rel: str) -> bool:
    """Whether analyze reads the file ``rel`` of a run folder (what ``Names.read_copy`` copies)."""
    parts = rel.split("/")
    for i, part in enumerate(parts[:-1]):
        if part in SKIPPED_FOLDERS:
            return False
        if part.startswith(CHECKPOINT_DIR + "."):  # a local save in progress
            return False
        if part == CHECKPOINT_DIR:  # a set still training: its state.json says so, not weights
            return parts[i + 1 :] == ["state.json"]
    return True


@contextlib.contextmanager
def copies() -> Iterator[Names]:
    """A ``Names`` whose local copies of what was read are removed when the block ends, however
    it ends (an output's copy is removed by its upload)."""
    names = Names()
    try:
        yield names
    finally:
        names.forget()


class Names:
    """Local copies of URLs, and the way back from their paths to the URLs."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}

    def read_copy(self, url: storage.Location, parts: tuple[str, ...] = ("",)) -> storage.Location:
        """``url`` itself when local; else a fresh local copy of what analyze reads under its
        ``parts`` (sub-folders; default: all of it)."""
        if not storage.is_remote(url):
            return url
        storage.check_access(url)
        folder = cache_folder("runs-read", url)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for part in parts:
            src = url / part if part else url
            times = storage.modified_times(src)
            files = sorted(f for f in times if wanted(f))
            storage.download_tree(src, folder / part, files)
            for f in files:
                os.utime(folder / part / f, (times[f], times[f]))
        self.urls[str(folder)] = str(url)
        return folder

    def out_folder(self, url: storage.Location) -> storage.Location:
        """Where to write an output meant for ``url``: itself when local, else an empty local
        folder copied up by ``upload``."""
        if not storage.is_remote(url):
            return url
        storage.check_access(url)
        folder = cache_folder("runs-out", url)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.urls[str(folder)] = str(url)
        return folder

    def show(self, text: object) -> str:
        """``text`` with every local copy's path replaced by its URL."""
        text = str(text)
        for local, url in sorted(self.urls.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(local, url)
        return text

    def rename_in_files(self, folder: Path) -> None:
        """The text files under ``folder`` name URLs rather than their local copies."""
        if not self.urls or not Path(folder).is_dir():
            return
        for rel in storage.list_files(folder):
            path = Path(folder) / rel
            if path.suffix not in TEXT_SUFFIXES:
                continue
            text = path.read_text(encoding="utf-8")
            shown = self.show(text)
            if shown != text:
                path.write_text(shown, encoding="utf-8")

    def upload(self, local: storage.Location, url: storage.Location) -> None:
        """An output written in ``local`` (``out_folder(url)``), renamed and copied up to
        ``url``, the local copy then removed; a local output is only renamed."""
        self.rename_in_files(Path(local))
        if storage.is_remote(url):
            storage.upload_tree(Path(local), url)
            shutil.rmtree(local, ignore_errors=True)

    def forget(self) -> None:
        """Remove the local copies read (the outputs are removed by ``upload``)."""
        for local in list(self.urls):
            if Path(local).parent.name == "runs-read":
                shutil.rmtree(local, ignore_errors=True)

    @contextlib.contextmanager
    def writing(self, out: storage.Location, what: str) -> Iterator[storage.Location]:
        """The folder to write the output meant for ``out`` in, while ``out`` is locked as this
        writer's (``what`` names it in the lock's messages). When the block ends cleanly the
        output is renamed and copied up to ``out``; an error leaves ``out`` as it was and names
        URLs, not their local copies."""
        with locking.hold(out, what=what):
            local = self.out_folder(out)
            with self.messages():
                yield local
            self.upload(local, out)

    @contextlib.contextmanager
    def messages(self) -> Iterator[None]:
        """Errors raised in the block name URLs, not their local copies."""
        try:
            yield
        except Exception as exc:
            if self.urls and exc.args and isinstance(exc.args[0], str):
                exc.args = (self.show(exc.args[0]), *exc.args[1:])
            raise
