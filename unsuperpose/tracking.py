"""Experiment logging: a local JSONL log always, and W&B offline unless the user opts in.

W&B must work with no account: the default mode is ``offline`` (files under ``<dir>/wandb``,
syncable later with ``wandb sync``); ``online`` needs a login; ``disabled`` writes nothing to W&B.
The JSONL log is the record we rely on ourselves, so it is written whatever the W&B mode.

Every long-running command takes ``--wandb MODE``, ``--wandb-project NAME`` and ``--wandb-entity
NAME`` (``add_wandb_arguments``); the command line sets them for the command's whole run
(``wandb_env``), so each tracker it opens, and those of the stages a demo runs, reads the same.
Unset, they are W&B's own variables: ``$WANDB_MODE`` (else offline), ``$WANDB_PROJECT`` (else
"unsuperpose") and ``$WANDB_ENTITY`` (else the login's default entity).

W&B is a copy for convenience, so an I/O fault in it (its files under ``<dir>/wandb`` on a full
disk) never ends a run: the tracker warns once and logs to the JSONL file alone from then on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from unsuperpose import faults

WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES = ("offline", "online", "disabled")
DEFAULT_PROJECT = "unsuperpose"


def default_wandb_mode() -> str:
    """``WANDB_MODE`` from the environment if set, else offline."""
    return os.environ.get("WANDB_MODE", "offline")


def wandb_project(project: str | None = None) -> str:
    """The W&B project: the one given, else ``$WANDB_PROJECT``, else "unsuperpose"."""
    return project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def add_wandb_arguments(parser: argparse.ArgumentParser) -> None:
    """``--wandb``, ``--wandb-project`` and ``--wandb-entity`` on ``parser``; a ``--wandb`` the
    command already has (its own help says what it tracks) is kept."""
    if not any(a.dest == "wandb" for a in parser._actions):
        parser.add_argument(
            "--wandb",
            choices=WANDB_MODES,
            default=None,
            help="W&B mode; online needs `wandb login` (default: $WANDB_MODE, else offline: "
            "files under the output's wandb/, for `wandb sync` later)",
        )
    parser.add_argument(
        "--wandb-project",
        default=None,
        metavar="NAME",
        help=f"W&B project (default: $WANDB_PROJECT, else {DEFAULT_PROJECT})",
    )
    parser.add_argument(
        "--wandb-entity",
        default=None,
        metavar="NAME",
        help="W&B entity, a user or a team (default: $WANDB_ENTITY, else the login's own)",
    )


@contextlib.contextmanager
def wandb_env(
    mode: str | None = None, project: str | None = None, entity: str | None = None
) -> Iterator[None]:
    """Within: ``$WANDB_MODE``, ``$WANDB_PROJECT`` and ``$WANDB_ENTITY`` set to those given
    (None leaves one as it is); restored after, so a command run in-process leaves none behind."""
    given = {"WANDB_MODE": mode, "WANDB_PROJECT": project, "WANDB_ENTITY": entity}
    given = {k: v for k, v in given.items() if v is not None}
    before = {k: os.environ.get(k) for k in given}
    os.environ.update(given)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Tracker:
    """Log scalars, tables and images for one run to ``<dir>/log.jsonl`` and to W&B."""

    def __init__(
        self,
        dir: str | Path,
        *,
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        config: dict | None = None,
        mode: str | None = None,
        resume_id: str | None = None,
        group: str | None = None,
    ):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.dir / "log.jsonl", "a", buffering=1)
        self.mode = mode or default_wandb_mode()
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"W&B mode must be offline, online or disabled, not {self.mode!r}")
        self.run = None
        if self.mode != "disabled":
            import wandb

            self.run = self._wandb(
                lambda: wandb.init(
                    project=wandb_project(project),
                    entity=entity or os.environ.get("WANDB_ENTITY") or None,
                    name=name,
                    config=config or {},
                    mode=self.mode,
                    dir=str(self.dir),
                    id=resume_id,
                    resume="allow" if resume_id else None,
                    group=group,
                    reinit="finish_previous",
                )
            )

    def _wandb(self, call: Callable[[], Any]) -> Any:
        """``call()`` into W&B; after an I/O fault, a warning and no more W&B (None)."""
        try:
            return call()
        except Exception as exc:
            fault = faults.classify(exc)
            if fault is None:
                raise
        where = fault.path or self.dir / "wandb"
        print(
            f"unsuperpose: warning: W&B stopped: {fault.cause} at {where}; the run goes on, "
            f"logging to {self.dir / 'log.jsonl'} alone",
            file=sys.stderr,
        )
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1, quiet=True)
            except Exception:  # noqa: BLE001 (it is being let go because it cannot write)
                pass
        return None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        record = {
            "time": round(time.time(), 3),
            **({"step": step} if step is not None else {}),
            **metrics,
        }
        self._log.write(json.dumps(record, default=float) + "\n")
        if self.run is not None:
            self._wandb(lambda: self.run.log(metrics, step=step))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self._wandb(lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}))

    def log_images(self, images: dict[str, str | Path]) -> None:
        if self.run is not None:
            import wandb

            self._wandb(lambda: self.run.log({k: wandb.Image(str(v)) for k, v in images.items()}))

    def summary(self, values: dict[str, Any]) -> None:
        self._log.write(json.dumps({"summary": values}, default=float) + "\n")
        if self.run is not None:
            self._wandb(lambda: self.run.summary.update(values))

    def finish(self) -> None:
        if self.run is not None:
            self._wandb(self.run.finish)
            self.run = None
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()
