"""Packaging facts that are easy to let drift: one version, declared dependencies, license, typing marker."""
import ast
import re
from pathlib import Path

import pytest

import ot_losses

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _imported_top_level_modules(package_dir):
    names = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_version_is_defined_once():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ot_losses.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", ot_losses.__version__)


def test_runtime_dependencies_are_the_imported_ones():
    declared = {re.split(r"[<>=!~ ;\[]", d)[0].lower() for d in PROJECT["dependencies"]}
    imported = _imported_top_level_modules(ROOT / "ot_losses")
    assert "numpy" not in imported and "numpy" not in declared
    assert declared == {"torch"}
    assert "triton" in imported  # optional: the kernels' extra, not a runtime dependency


def test_lower_bounds_are_what_ci_installs():
    ci = (ROOT / ".ci" / "run").read_text()
    torch_pin = re.search(r"torch==(\d+\.\d+)", ci).group(1)
    assert f"torch>={torch_pin}" in PROJECT["dependencies"]
    assert any(d.startswith("triton>=") for d in PROJECT["optional-dependencies"]["triton"])


def test_license_file_and_typing_marker_ship_with_the_package():
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the ot_losses authors" in text
    assert (ROOT / "ot_losses" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["ot_losses"]
    assert "Typing :: Typed" in PROJECT["classifiers"]
