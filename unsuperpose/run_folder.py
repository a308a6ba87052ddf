"""A run folder that a command writes: one writer at a time, and on object storage a local
mirror copied up as the run goes.

``locked_run(out, device)`` places this rank (``distributed.setup``) and holds the folder's lock
(``unsuperpose.locking``) until the run is done; ``RunMirror`` is the local copy of a run whose
folder is a URL. Both are the stages' common ground: a training run (``train.run_grid``) uses
them, and so may any stage that writes a run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from unsuperpose import distributed, locking, storage
from unsuperpose.config import write_text_atomic
from unsuperpose.errors import UserError


def cache_folder(kind: str, url: storage.ObjectPath) -> Path:
    """``$UNSUPERPOSE_CACHE/<kind>/<hash of the URL>``: where a URL's local copy of ``kind``
    lives (``runs-mirror`` for a run written, ``runs-read``/``runs-out`` for analyze's)."""
    root = Path(os.environ.get("UNSUPERPOSE_CACHE", "runs/cache"))
    return root / kind / hashlib.sha256(str(url).encode()).hexdigest()[:16]


def check_run_folder(out) -> None:
    """Before any work: one clear error if a run folder on object storage cannot be used."""
    if not storage.is_remote(out):
        return
    world = os.environ.get("WORLD_SIZE", "1")
    if distributed.launched_by_torchrun() and os.environ.get("LOCAL_WORLD_SIZE", world) != world:
        # Rank 0 downloads the run into its node's mirror; ranks on other nodes would not see it.
        raise UserError(
            f"--out {out} is on object storage, which a run over several nodes "
            "cannot share (only rank 0's node would see the downloaded run); give a "
            "folder on a filesystem every node mounts"
        )
    storage.check_access(out)


@contextlib.contextmanager
def locked_run(out, device: str):
    """This rank's placement (``distributed.setup``), with the run folder ``out`` locked until
    the command is done (``unsuperpose.locking``): a second run into it is refused at once."""
    check_run_folder(out)
    placement = distributed.setup(device)
    with locking.hold(out, what=f"the run folder {out}"):
        yield placement


class RunMirror:
    """A run folder on object storage, worked on in a local folder and copied up to its URL.

    Training writes plain files (safetensors, renames that make checkpoints atomic, W&B's own
    files), so a run whose --out is a URL works in ``$UNSUPERPOSE_CACHE/runs-mirror/<hash of
    the URL>``, started from what the URL holds, and copies it up after every checkpoint (a
    killed run resumes from the URL on any machine) and at the end. Rank 0 alone copies; the
    ranks of one node share the mirror.

    Each copy sends only the files that changed since the last one (their size and SHA-256, in
    ``<mirror>.uploaded.json`` beside the mirror, never uploaded) and deletes from the URL the
    files the run removed since; files on the URL the mirror never held are left alone.
    """

    def __init__(
        self,
        url: storage.ObjectPath,
        *,
        checkpoint_dir: str = "checkpoint",
        run_files: tuple[str, ...] = ("summary.csv", "train_config.json"),
    ):
        self.url = url
        # A run folder's own names (train/layout.py's, which the core cannot import): its
        # checkpoint folder, and the files whose presence together says a run finished there.
        self.checkpoint_dir = checkpoint_dir
        self.run_files = run_files
        self.folder = cache_folder("runs-mirror", url)
        self.manifest = self.folder.with_name(self.folder.name + ".uploaded.json")

    def _holds_run(self) -> bool:
        return storage.exists(self.url / self.checkpoint_dir) or all(
            storage.exists(self.url / f) for f in self.run_files
        )

    def pull(self, force: bool = False) -> None:
        """The mirror becomes what the URL holds: its run, or nothing (a stale mirror is replaced,
        so the identity checks judge the URL's run, never an older local copy). ``force``: the
        URL's checkpoint goes now, as --force deletes a local one before training."""
        if distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)
            self.manifest.unlink(missing_ok=True)
            if force:
                storage.remove_tree(self.url / self.checkpoint_dir, first="state.json")
            if self._holds_run():
                print(f"{self.url} holds a run: downloading it to compare with this one")
                storage.download_tree(self.url, self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            # What was downloaded is on the URL already: a copy up sends only what changes.
            self._save_manifest({f: self._stat(f) for f in self._files()})
        distributed.barrier()

    # -- what was copied up: path -> [size, mtime_ns, sha256] ----------------------------------

    def _load_manifest(self) -> dict[str, list]:
        try:
            return json.loads(self.manifest.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _save_manifest(self, manifest: dict[str, list]) -> None:
        write_text_atomic(self.manifest, json.dumps(manifest, sort_keys=True))

    def _stat(self, rel: str, known: list | None = None) -> list:
        """``rel``'s [size, mtime_ns, sha256]; the hash is reused from ``known`` when neither
        the size nor the modification time changed."""
        st = (self.folder / rel).stat()
        if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            return list(known)
        digest = hashlib.sha256()
        with open(self.folder / rel, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return [st.st_size, st.st_mtime_ns, digest.hexdigest()]

    def _changes(self) -> tuple[dict[str, list], dict[str, list], list[str], list[str]]:
        """(manifest, the files' state now, files changed or new, files removed since)."""
        manifest = self._load_manifest()
        now = {f: self._stat(f, manifest.get(f)) for f in self._files()}
        changed = [f for f in sorted(now) if f not in manifest or manifest[f][::2] != now[f][::2]]
        removed = sorted(f for f in manifest if f not in now)
        return manifest, now, changed, removed

    def _delete(self, files: list[str]) -> None:
        for f in files:
            storage.remove_tree(self.url / f)

    def _files(self) -> list[str]:
        # checkpoint.tmp / checkpoint.old are a local save in progress, never copied up.
        return [
            f
            for f in storage.list_files(self.folder)
            if not f.split("/", 1)[0].startswith(self.checkpoint_dir + ".")
        ]

    def upload_checkpoint(self) -> None:
        """Rank 0, each time the Checkpointer has written one: the checkpoint up, with the files
        beside it. Its state.json is deleted first and copied last, so a copy cut short leaves
        a checkpoint without state.json (not resumed; the run starts over), never new weights
        under an old step."""
        locking.check_held(self.url)  # a run that lost its lease leaves the URL to the new holder
        meta = f"{self.checkpoint_dir}/state.json"
        manifest, now, changed, removed = self._changes()
        storage.remove_tree(self.url / meta)
        manifest.pop(meta, None)
        self._save_manifest(manifest)  # state.json is gone from the URL, whatever follows
        storage.upload_tree(self.folder, self.url, [f for f in changed if f != meta])
        self._delete([f for f in removed if f != meta])
        if meta in now:
            storage.upload_tree(self.folder, self.url, [meta])
        self._save_manifest(now)

    def push(self) -> None:
        """Rank 0, at the end: the whole run up; then the URL's checkpoint goes, as a local run's
        does (state.json first, so a removal cut short is not taken for a checkpoint)."""
        locking.check_held(self.url)
        _, now, changed, removed = self._changes()
        storage.upload_tree(self.folder, self.url, changed)
        storage.remove_tree(self.url / self.checkpoint_dir, first="state.json")
        self._delete([f for f in removed if f.split("/", 1)[0] != self.checkpoint_dir])
        self._save_manifest(now)
