"""The floors pyproject.toml declares are the versions `make test-floor` installs (.ci/floor.txt)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_pinned_floor_is_the_declared_lower_bound():
    tomllib = pytest.importorskip("tomllib")
    from packaging.version import Version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*>=\s*([0-9][0-9.]*)", requirement.strip())
        if found:
            declared[found[1].lower()] = Version(found[2])
    pinned = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+)", line).groups()
                  for line in (ROOT / ".ci" / "floor.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert pinned and all(declared.get(name.lower()) == Version(version) for name, version in pinned.items()), (pinned, declared)
