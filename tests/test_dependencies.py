"""pyproject.toml's dependencies say what they are, and constraints.txt pins what make installs.

- Every dependency of the package and of its extras `real`, `wiki` and `s3` is used: imported by
  the package's code, or (for the packages that only ship data) located by its module name and
  read by path. `dev` is tools (pytest, ruff, moto, mkdocs), not read here.
- Every floor can be installed beside the rest: no direct dependency, as installed, asks more of
  another than our floor allows (transformer-lens 4.3 asks torch >= 2.6, transformers >= 5.9).
- constraints.txt pins every package installed for the project, torch at the Makefile's TORCH
  and without a local label (so a CUDA machine resolves the same release), and never the project.

Read from the files and the installed metadata; nothing is installed or fetched here.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS_READ = ("real", "wiki", "s3")
# Distributions whose import name differs from the distribution's name.
MODULE = {"scikit-learn": "sklearn", "transformer-lens": "transformer_lens", "s3fs": "s3fs"}


def _requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    optional = PROJECT["optional-dependencies"]
    reqs = PROJECT["dependencies"] + [r for e in extras for r in optional[e]]
    return [Requirement(r) for r in reqs]


def _source() -> str:
    """All of the package's code: the folders pyproject's package-dir maps, and the root's."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {ROOT / folder for folder in setup.get("package-dir", {}).values()}
    folders.add(ROOT / "unsuperpose")
    return "\n".join(p.read_text() for f in sorted(folders) for p in sorted(f.rglob("*.py")))


def _module(name: str) -> str:
    return MODULE.get(canonicalize_name(name), canonicalize_name(name).replace("-", "_"))


@pytest.mark.parametrize("req", _requirements(EXTRAS_READ), ids=str)
def test_every_declared_dependency_is_used(req: Requirement) -> None:
    mod = re.escape(_module(req.name))
    source = _source()
    imported = re.search(rf"^\s*(import|from) {mod}\b", source, re.M)
    located = re.search(rf"[\"']{mod}[\"']", source)  # find_spec("module"): read by path
    assert imported or located, f"{req.name} is declared in pyproject.toml but never used"


def test_no_unused_dependency_is_declared() -> None:
    names = {canonicalize_name(r.name) for r in _requirements(EXTRAS_READ)}
    assert not names & {"einops", "numcodecs"}, "installed by their users, never imported here"


def _installed() -> dict[str, md.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}


@pytest.mark.parametrize("req", _requirements(), ids=str)
def test_floors_meet_what_the_installed_packages_require(req: Requirement) -> None:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    if not floors:
        pytest.skip(f"{req} has no floor")
    ours = max(floors)
    name = canonicalize_name(req.name)
    direct = {canonicalize_name(r.name) for r in _requirements()}
    asked = []
    for dist in (d for n, d in _installed().items() if n in direct):
        for raw in dist.requires or []:
            other = Requirement(raw)
            if canonicalize_name(other.name) != name:
                continue
            if other.marker is not None and not other.marker.evaluate({"extra": ""}):
                continue
            for spec in other.specifier:
                if spec.operator == ">=" and Version(spec.version) > ours:
                    asked.append(f"{dist.metadata['Name']} asks {other.name}{other.specifier}")
    assert not asked, f"pyproject's floor {req} is below what others ask: {asked}"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a pin name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_declared_package_and_not_the_project() -> None:
    pins = _constraints()
    assert "unsuperpose" not in pins
    extras = tuple(PROJECT["optional-dependencies"])
    missing = [str(r) for r in _requirements(extras) if canonicalize_name(r.name) not in pins]
    assert not missing, f"constraints.txt lacks {missing}: run `make constraints`"
    for req in _requirements(extras):
        pin = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(pin, prereleases=True), f"{req} excludes its pin {pin}"


def test_constraints_pin_torch_as_the_makefile_installs_it() -> None:
    torch = re.search(r"^TORCH \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert torch, "the Makefile names torch's release as TORCH ?= ..."
    assert _constraints()["torch"] == torch.group(1), "torch: no local label, the Makefile's"


def test_installed_versions_are_the_pinned_ones() -> None:
    """A venv made by `make install` holds the pinned versions (one installed by hand may not)."""
    installed = _installed()
    differ = [
        f"{name} {installed[name].version} (pinned {pin})"
        for name, pin in _constraints().items()
        if name in installed and installed[name].version.split("+")[0] != pin
    ]
    assert not differ, f"installed versions differ from constraints.txt: {differ}"
