"""The package's layout promises (issue 16 items 5 and 7): module docstrings say what a file is
for in a few lines, and no file imports another module's private (underscore) name."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "metabook").rglob("*.py"))
DOCSTRING_LINES = 8


def _code_cells_of(notebook: Path) -> str:
    """The notebook's code cells as one Python source, each IPython magic line a `pass`."""
    cells = json.loads(notebook.read_text())["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return "\n".join(l[:len(l) - len(l.lstrip())] + "pass" if l.lstrip().startswith(("%", "!")) else l
                     for l in lines)


def _sources() -> dict[str, str]:
    files = MODULES + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    out = {str(f.relative_to(ROOT)): f.read_text() for f in files}
    out.update({str(nb.relative_to(ROOT)): _code_cells_of(nb) for nb in sorted((ROOT / "book").glob("*.ipynb"))})
    return out


def private_imports(source: str) -> list[str]:
    """`from metabook.x import _y` (or `from .x import _y`) and `metabook.x._y`: the private names of
    another metabook module that `source` uses."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("metabook")):
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "metabook":
                found.append(ast.unparse(node))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_docstring_says_what_the_file_is_for_in_a_few_lines(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.name} has no module docstring"
    assert len(doc.splitlines()) <= DOCSTRING_LINES, (
        f"{path.name}: {len(doc.splitlines())} lines of module docstring; the derivations belong in the chapters")


def test_no_file_imports_a_private_name_of_another_metabook_module():
    offenders = {name: found for name, src in _sources().items() if (found := private_imports(src))}
    assert not offenders, offenders


def test_the_private_import_check_sees_both_spellings():
    assert private_imports("from metabook.train import _StopRequest, train") == ["metabook.train._StopRequest"]
    assert private_imports("from .teach import _fmt") == ["teach._fmt"]
    assert private_imports("import metabook.plan\nmetabook.plan._evaluations(1, 2, 3)") == ["metabook.plan._evaluations"]
    assert private_imports("from metabook import __version__\nfrom os import _exit") == []
