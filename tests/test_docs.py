"""The documentation: docstring examples run, docs/ exists, and every reference resolves in the repository."""
import ast
import doctest
import importlib
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

MODULES = ["ot_losses.solvers.sinkhorn", "ot_losses.solvers.partial", "ot_losses.solvers.multi_assignment",
           "ot_losses.losses.swamp", "ot_losses.losses.l2rm", "ot_losses.losses.multi_sk",
           "ot_losses.losses.info_nce"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0


# ----------------------------------------------------------------------------- docs/ and references to it
ROOT = Path(__file__).resolve().parents[1]
MD_REF = re.compile(r"(?<![\w/.-])((?:\.\./|[\w-]+/)*[\w.-]*\w\.md)\b")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
SECTION_REF = re.compile(r"docs/methods\.md,? (?:sections? )?(\d+(?:\.\d+)?)")


def _sources():
    """Where users meet references: the package, the benchmarks, the README and docs/."""
    files = [*sorted((ROOT / "ot_losses").rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py")),
             ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def _prose(source):
    """What a reader sees as text: a Markdown file, or a Python file's docstrings and comments
    (string literals in code are file names the code writes, not references)."""
    text = source.read_text()
    if source.suffix == ".md":
        return text
    tree = ast.parse(text)
    docs = [ast.get_docstring(node) or "" for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    comments = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                if tok.type == tokenize.COMMENT]
    return "\n".join(docs + comments)


def _resolves(ref, source):
    return any((base / ref).resolve().is_file() for base in (ROOT, source.parent))


def test_docs_exist_and_readme_links_them():
    readme = (ROOT / "README.md").read_text()
    for page in ("index.md", "methods.md", "api.md", "choosing_parameters.md"):
        assert (ROOT / "docs" / page).is_file(), page
        assert f"docs/{page}" in readme, page


def test_every_markdown_reference_resolves_inside_the_repository():
    missing = []
    for source in _sources():
        text = _prose(source)
        refs = set(MD_REF.findall(text))
        if source.suffix == ".md":
            refs |= {r for r in LINK.findall(text) if "://" not in r}
        missing += [f"{source.relative_to(ROOT)}: {ref}" for ref in sorted(refs)
                    if not _resolves(ref, source)]
    assert not missing, missing


def test_nothing_points_outside_the_repository():
    """No tracked file refers to the briefing folder next to the checkout; the package, benchmarks,
    README and docs/ name no .md file other than the repository's own (checked above)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    files = ([ROOT / f for f in tracked.stdout.split()] if tracked.returncode == 0
             else [p for p in ROOT.rglob("*") if ".git" not in p.parts])
    needle = "../" + "shared"  # spelled in two parts so that this file does not match itself
    offenders = [str(p.relative_to(ROOT)) for p in files
                 if p.is_file() and p.suffix in (".py", ".md", ".toml", ".cfg", ".txt", "")
                 and needle in p.read_text(errors="replace")]
    assert not offenders, offenders
    for source in _sources():
        assert not re.search(r"(?<![\w/])(METHODS|API)\.md", _prose(source)), source


def test_cited_methods_sections_exist():
    text = (ROOT / "docs" / "methods.md").read_text()
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", text, re.M))
    cited = {(str(s.relative_to(ROOT)), n) for s in _sources() for n in SECTION_REF.findall(_prose(s))}
    assert cited, "no section of docs/methods.md is cited"
    assert not [c for c in cited if c[1] not in headings], sorted(c for c in cited if c[1] not in headings)


def test_index_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "index.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/index.md", "exec"), {})
