"""CLI fuzz (issue 10): random flags and random data files through the argument parser, the
config checks and the data readers. Property: exit 0, or exit 2 with one line on stderr;
never a traceback (any other exception fails the test).

No model is loaded: the first heavy call of each subcommand (loading a model) is replaced
by one that raises :class:`Reached`, which counts as "the input was accepted".
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from smoothlab.cli import build_parser, main  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]


class Reached(Exception):
    """The command got past its argument and input checks to the heavy part."""


def _reached(*args, **kwargs):
    raise Reached


def _flags() -> dict[str, list[str]]:
    """Every option string of every subcommand (from the real parser)."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: sorted(s for a in p._actions for s in a.option_strings if s not in ("-h", "--help"))
        for name, p in sub.choices.items()
    }


FLAGS = _flags()
VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "-1",
            "2",
            "1e-3",
            "nan",
            "inf",
            "-inf",
            "",
            " ",
            "auto",
            "cpu",
            "mps",
            "cuda:7",
            "9" * 30,
            "1,2",
            "0.5,-1",
            "hybrid-lora",
            "zo-ft",
            "fo-ft",
            "lora",
            "sst2",
            "copa",
            "a=*query*,a=*key*",
            "=x",
            "layers",
            "spectral",
            "fd",
            "fixed",
            "current",
            "/nonexistent/x.tsv",
            "/dev/null",
            "/",
            "x.json",
            "x.yaml",
            "gaussian",
            "rademacher",
        ]
    ),
    st.text(max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@st.composite
def argv(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(FLAGS)))
    args = [command]
    if command == "report":
        args += draw(st.lists(st.sampled_from(["/nonexistent", "/", "."]), max_size=2))
    for flag in draw(st.lists(st.sampled_from(FLAGS[command]), max_size=5)):
        args.append(flag)
        if draw(st.booleans()) or not flag.startswith("--no-"):
            args.append(draw(VALUES))
    if draw(st.integers(0, 9)) == 0:
        args.insert(draw(st.integers(0, len(args))), draw(st.sampled_from(["--help", "-h"])))
    return args


@contextlib.contextmanager
def no_heavy_work():
    """Model loading (and so probing, training, advising) raises :class:`Reached`."""
    with contextlib.ExitStack() as stack:
        for target in (
            "smoothlab.hybrid.models.load_model",  # train, probe and advise load through it
            "smoothlab.figures.report.write_report",
        ):
            stack.enter_context(mock.patch(target, _reached))
        yield


def run_cli(args: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                rc = main(args)
            except Reached:
                return
            except SystemExit as e:  # argparse's --help
                assert e.code == 0, (args, e.code, err.getvalue())
                return
    text = err.getvalue()
    assert rc in (0, 2), (args, rc, text)
    if rc == 2:
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("smoothlab"), (args, text)
        assert "Traceback" not in text


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(args=argv())
def test_random_flags_exit_0_or_2_with_one_line(args):
    with no_heavy_work():
        run_cli(args)


# ----------------------------------------------------------------------------- data files
CELL = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "2",
            "-1",
            "positive",
            "negative",
            "",
            "nan",
            '"',
            '""',
            "a\tb",
            "x" * 140_000,
            "\ufeffsentence",
            "label",
            "sentence",
            "text",
        ]
    ),
    st.text(max_size=20),
)
ROWS = st.lists(st.lists(CELL, min_size=0, max_size=4), max_size=6)


@st.composite
def data_file(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".tsv", ".csv", ".jsonl", ".json", ".txt", ""]))
    kind = draw(st.sampled_from(["table", "json", "bytes"]))
    if kind == "bytes":
        return suffix, draw(st.binary(max_size=200))
    if kind == "json":
        import json

        value = draw(
            st.recursive(
                st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
                lambda c: st.one_of(
                    st.lists(c, max_size=3),
                    st.dictionaries(
                        st.sampled_from(["sentence", "label", "text", "premise", "x"]),
                        c,
                        max_size=3,
                    ),
                ),
                max_leaves=8,
            )
        )
        lines = draw(st.booleans())
        text = "\n".join(
            json.dumps(v) for v in (value if lines and isinstance(value, list) else [value])
        )
        return suffix, text.encode()
    sep = "\t" if suffix == ".tsv" else ","
    rows = [["sentence", "label"]] if draw(st.booleans()) else []
    rows += draw(ROWS)
    text = "\n".join(sep.join(r) for r in rows)
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return suffix, text.encode(encoding, errors="replace")


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    file=data_file(),
    task=st.sampled_from(["sst2", "copa", "wic", "winogrande"]),
    command=st.sampled_from(["train", "probe"]),
)
def test_random_data_files_exit_0_or_2_with_one_line(file, task, command):
    suffix, content = file
    with tempfile.TemporaryDirectory() as tmp, no_heavy_work():
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        args = [command, "--data", str(path), "--task", task, "--batch-size", "2"]
        if command == "train":
            args += [
                "--out",
                str(Path(tmp) / "run"),
                "--train-size",
                "2",
                "--eval-size",
                "1",
                "--dev-size",
                "1",
            ]
        run_cli(args)
