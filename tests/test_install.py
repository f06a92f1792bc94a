"""What a user gets from ``pip install smoothlab``: the packages the wheel holds, the version,
and ``smoothlab`` / ``python -m smoothlab`` run from a folder that is not the source tree.

The fast tests read the packaging metadata (setuptools' own package discovery, configured from
pyproject.toml); the slow one builds the wheel and installs it into a fresh venv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TOP_LEVEL = ("smoothlab",)  # hybrid, analysis and figures are its subpackages


def _discovered(where: Path) -> set[str]:
    """The packages ``[tool.setuptools.packages.find]`` selects under ``where``."""
    from setuptools import find_namespace_packages

    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    assert find.get("namespaces", True), "the test assumes namespace discovery (the default)"
    return set(
        find_namespace_packages(
            where=str(where), include=find.get("include", ("*",)), exclude=find.get("exclude", ())
        )
    )


def _source_packages(where: Path) -> set[str]:
    """Every folder of the four top-level packages that holds a .py file, as a dotted name."""
    found = set()
    for top in TOP_LEVEL:
        for py in (where / top).rglob("*.py"):
            rel = py.parent.relative_to(where)
            if "__pycache__" not in rel.parts:
                found.add(".".join(rel.parts))
    return found


def test_every_package_directory_is_packaged():
    assert set(TOP_LEVEL) <= _source_packages(ROOT)
    assert _discovered(ROOT) == _source_packages(ROOT)


def test_sibling_folders_are_not_packaged(tmp_path):
    """Folders that only start with a package's name (the CLI's default output folder
    ``smoothlab-out``, a scratch ``hybrid_old``) and the test/bench folders stay out."""
    for top in TOP_LEVEL:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    for junk in (
        "smoothlab-out",
        "smoothlab_scratch",
        "hybrid_old",
        "hybrid",
        "figures",
        "tests",
        "bench",
    ):
        (tmp_path / junk).mkdir()
        (tmp_path / junk / "x.py").write_text("")
    assert _discovered(tmp_path) == set(TOP_LEVEL)


def test_version_matches_the_package_metadata():
    import smoothlab

    assert smoothlab.__version__ == PYPROJECT["project"]["version"]


def test_version_flag(capsys):
    from smoothlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"smoothlab {PYPROJECT['project']['version']}"


def _user_folder(tmp_path: Path) -> Path:
    """A user's working folder whose own modules share names with smoothlab's packages."""
    cwd = tmp_path / "project"
    cwd.mkdir()
    for name in ("hybrid", "figures", "analysis"):
        (cwd / f"{name}.py").write_text("raise SystemExit('the user module was imported')\n")
    return cwd


def test_python_dash_m_ignores_same_named_modules_in_the_working_folder(tmp_path):
    """``python -m`` puts the working folder first on sys.path; a user's ``figures.py`` or
    ``hybrid.py`` there cannot replace smoothlab's subpackages (they are ``smoothlab.*``: no
    generic top-level names)."""
    cwd = _user_folder(tmp_path)
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "smoothlab", "report", "--help"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "usage: smoothlab report" in r.stdout


@pytest.mark.slow
def test_the_built_wheel_runs_from_another_folder(tmp_path):
    """Build the wheel, install it (no deps: those of this venv serve) into a target folder,
    and run its console script and ``python -m smoothlab`` from an unrelated folder on a user's
    own model folder and data file: nothing may resolve paths next to the source tree."""
    import zipfile

    from tests.tiny_models import tiny_encoder

    wheels, target, cwd = tmp_path / "wheels", tmp_path / "site", _user_folder(tmp_path)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", str(ROOT), "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("smoothlab-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops - {f"smoothlab-{PYPROJECT['project']['version']}.dist-info"} == set(TOP_LEVEL)
    files = zipfile.ZipFile(wheel).namelist()
    for package in _source_packages(ROOT):
        assert f"{package.replace('.', '/')}/__init__.py" in files or any(
            n.startswith(package.replace(".", "/") + "/") for n in files
        ), package
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)

    model = tmp_path / "model"
    tiny_encoder(seed=0, save_dir=model)
    data = tmp_path / "mine.tsv"
    rows = [f"{w} movie\t{i % 2}" for i, w in enumerate(["good", "bad", "fine", "dull"] * 4)]
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    env = os.environ | {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    script = str(target / "bin" / "smoothlab")
    r = run(script, "--version")
    assert r.returncode == 0 and r.stdout.strip().endswith(PYPROJECT["project"]["version"]), r
    common = ["--model", str(model), "--data", str(data), "--batch-size", "4"]
    r = run(script, "probe", *common, "--vectors", "2", "--out", str(tmp_path / "probe.json"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    sizes = ["--train-size", "8", "--eval-size", "4", "--dev-size", "4", "--steps", "2"]
    train = ["train", "--method", "hybrid-lora", *common, *sizes, "--out", str(out)]
    r = run(sys.executable, "-m", "smoothlab", *train)
    assert r.returncode == 0, r.stderr
    assert (out / "metrics.csv").is_file()
    r = run(sys.executable, "-m", "smoothlab", "report", str(out), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    r = run(script, "probe", "--data", str(tmp_path / "missing.tsv"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.tsv" in r.stderr, r
