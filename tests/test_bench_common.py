"""benchmarks/common.py's provenance: a bench record names the code that made it."""

import subprocess
from pathlib import Path

import pytest

from benchmarks.common import git_commit

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_git_commit_names_the_checkout_and_says_when_it_is_dirty():
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert git_commit() == (f"{head}-dirty" if dirty else head)
