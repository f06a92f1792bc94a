"""docs/design.md describes the code that exists: the packages' imports and the run-folder columns.

Reads the source with ``ast`` (nothing is imported), so it is fast and fails on the first
import that crosses a layer the way design.md forbids.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from smoothlab.runlog import METRICS_FIELDS, SMOOTHNESS_FIELDS

ROOT = Path(__file__).resolve().parents[1]
DESIGN = (ROOT / "docs" / "design.md").read_text()
LAYERS = ("hybrid", "analysis", "figures")  # subpackages of smoothlab, above its core


def _layer(name: str) -> str:
    """``hybrid``/``analysis``/``figures`` for a module of those subpackages, else the top
    name (``smoothlab`` for the core, ``torch``, ...)."""
    parts = name.split(".")
    if parts[0] == "smoothlab" and len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return parts[0]


def _imports(path: Path) -> set[str]:
    """Absolute names of every module the file imports, at any depth (lazy ones included)."""
    pkg = path.relative_to(ROOT).parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*pkg[: len(pkg) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def _package_imports(package: str, skip: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """The imports of each file of ``package`` (a folder); for ``smoothlab``, its core only
    (the layers above it are subpackages, read on their own)."""
    return {
        str(p.relative_to(ROOT)): _imports(p)
        for p in sorted((ROOT / package).rglob("*.py"))
        if p.name not in skip
        and not (package == "smoothlab" and p.relative_to(ROOT).parts[1] in LAYERS)
    }


def _offenders(files: dict[str, set[str]], bad) -> dict[str, list[str]]:
    out = {f: sorted(n for n in names if bad(n)) for f, names in files.items()}
    return {f: v for f, v in out.items() if v}


def test_core_imports_none_of_the_other_packages():
    # "smoothlab/cli.py | everything, lazily, inside each subcommand" is the one exception
    files = _package_imports("smoothlab", skip=("cli.py",))
    assert files
    bad = _offenders(files, lambda n: _layer(n) in LAYERS)
    assert not bad, f"smoothlab core imports a package above it: {bad}"


def test_hybrid_imports_neither_analysis_nor_figures():
    bad = _offenders(
        _package_imports("smoothlab/hybrid"), lambda n: _layer(n) in ("analysis", "figures")
    )
    assert not bad


def test_analysis_reads_only_the_torch_free_core_and_never_figures_or_hybrid():
    allowed = ("smoothlab.runlog", "smoothlab.errors")  # as design.md's table says
    files = _package_imports("smoothlab/analysis")

    def bad(n: str) -> bool:
        if _layer(n) == "smoothlab":
            return not n.startswith(allowed) and n not in ("smoothlab", "smoothlab.analysis")
        return _layer(n) in ("hybrid", "figures", "torch", "matplotlib")

    assert not _offenders(files, bad)
    for name in allowed:
        assert f"`{name}`" in DESIGN


def test_figures_read_analysis_and_the_torch_free_core_only():
    allowed = ("smoothlab.methods", "smoothlab.errors", "smoothlab.runlog")
    files = _package_imports("smoothlab/figures")

    def bad(n: str) -> bool:
        if _layer(n) == "smoothlab":
            return not n.startswith(allowed) and n not in ("smoothlab", "smoothlab.analysis")
        return _layer(n) in ("hybrid", "torch")

    assert not _offenders(files, bad)


@pytest.mark.parametrize(
    "file, fields", [("metrics.csv", METRICS_FIELDS), ("smoothness.csv", SMOOTHNESS_FIELDS)]
)
def test_run_folder_columns_are_the_schemas(file, fields):
    row = re.search(rf"^\| `{re.escape(file)}` \| .*?`([a-z_, ]+)`", DESIGN, re.M)
    assert row, f"design.md's run-folder table lists no columns for {file}"
    assert tuple(c.strip() for c in row.group(1).split(",")) == fields


def test_the_files_the_layout_names_exist():
    named = set(re.findall(r"`(smoothlab/[\w/]*\.py)`", DESIGN))
    for pkg, holds in re.findall(
        r"^\| `(smoothlab(?:/hybrid|/analysis|/figures)?)/` \| (.*?) \|", DESIGN, re.M
    ):
        named |= {f"{pkg}/{n}" for n in re.findall(r"`(\w+\.py)`", holds)}
    named |= {f"smoothlab/{n}.py" for n in ("runlog", "methods", "errors", "cli")}
    assert len(named) > 20
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing
