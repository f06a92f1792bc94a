"""The README and docs/*.md say what the code does: their commands parse and their Python runs.

* Every `smoothlab ...` line of a code block in README.md and docs/scaling.md (torchrun's
  `-m smoothlab ...` included) is parsed by the real parser, so a renamed flag, a dropped
  choice or a wrong subcommand fails here.
* Every `--flag` named anywhere in README.md and docs/*.md is an option of some smoothlab
  subcommand, of torchrun, or of the bench script the docs cite.
* The README's Python quick start runs as written (the SST-2 path points at a 16-line copy
  in the same format, and the probe uses 2 vectors instead of 10 to stay fast) and prints
  the values its comment gives for Example 2.3.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from smoothlab.cli import build_parser
from smoothlab.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "design.md", ROOT / "docs" / "scaling.md"]
# flags of torchrun and of other tools the docs show beside smoothlab's own
EXTERNAL = {
    "--standalone",
    "--nproc-per-node",
    "--nnodes",
    "--node-rank",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--check",  # ruff format --check
}


def _code_lines(path: Path) -> list[str]:
    """The lines of ```bash blocks and of 4-space-indented blocks, continuations joined."""
    block: list[str] = []
    fence: str | None = None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in ("bash", "sh", "") or (fence is None and line.startswith("    ")):
            block.append(line)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(block))
    return [ln.strip() for ln in joined.splitlines() if ln.strip()]


def _smoothlab_argvs() -> list[tuple[str, list[str]]]:
    out = []
    for path in (ROOT / "README.md", ROOT / "docs" / "scaling.md"):
        for line in _code_lines(path):
            line = line.split(" # ", 1)[0].strip()
            if line.startswith("#"):
                continue
            words = shlex.split(line)
            if words[:1] == ["smoothlab"]:
                argv = words[1:]
            elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == [
                "smoothlab"
            ]:
                argv = words[words.index("-m") + 2 :]
            else:
                continue
            out.append((f"{path.name}: {line}", [w for w in argv if w != "..."]))
    return out


ARGVS = _smoothlab_argvs()


def test_the_docs_show_commands():
    # the extraction itself must find them, or the test below checks nothing
    assert len(ARGVS) >= 15
    assert {a[0] for _, a in ARGVS} == {"probe", "train", "advise", "figure1", "report", "export"}


@pytest.mark.parametrize("where, argv", ARGVS, ids=[w for w, _ in ARGVS])
def test_every_documented_command_parses(where, argv, capsys):
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:  # the top-level parser: exit 2 and a usage line
        pytest.fail(f"{where}\n{capsys.readouterr().err}\n(exit {e.code})")
    except UsageError as e:  # a subcommand's parser raises it (the CLI exits 2)
        pytest.fail(f"{where}\n{e}")
    assert ns.command == argv[0]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    opts = {s for a in parser._actions for s in a.option_strings}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                opts |= _options(sub)
    return opts


def test_every_documented_flag_exists():
    known = _options(build_parser()) | EXTERNAL
    bench = "\n".join(p.read_text() for p in (ROOT / "bench").glob("*.py"))
    missing = {}
    for path in DOCS:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", path.read_text()):
            if flag not in known and f'"{flag}"' not in bench:
                missing.setdefault(flag, path.name)
    assert not missing, f"flags the docs name that nothing accepts: {missing}"


def _quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Quick start: Python\n\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its '## Quick start: Python' block"
    return m.group(1)


def test_readme_python_quick_start_runs(tmp_path):
    code = _quick_start()
    data = "../shared/data/sst2/train.tsv"
    assert data in code and "num_vectors=10" in code
    tsv = tmp_path / "train.tsv"
    rows = [f"a {'fine' if i % 2 else 'dull'} film number {i}\t{i % 2}" for i in range(16)]
    tsv.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    code = code.replace(data, str(tsv)).replace("num_vectors=10", "num_vectors=2")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**_env(), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    # the comment beside the first print: "200.0 2.0  (= 2a, 2b)"
    assert lines[0] == "200.0 2.0"
    assert "'base': Estimate(" in lines[1] and "'peft': Estimate(" in lines[1]
    assert any(ln.startswith("eta_x") for ln in lines[2:])


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
