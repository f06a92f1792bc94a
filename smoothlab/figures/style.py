"""One paper style for every figure: sizes for a paper column, a colorblind-safe palette,
colors that stay attached to a method (or block) across figures, and :func:`savefig`.

The palette is Okabe & Ito's (2008) eight colors, distinguishable under the common forms
of color-vision deficiency. Known methods and blocks have fixed colors; any other label
gets one chosen by a CRC-32 of its name, so the same label has the same color in every
figure and every process (Python's ``hash`` is salted per process, so it is not used).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless, and identical output everywhere; before pyplot

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from smoothlab.methods import METHODS  # noqa: E402

__all__ = [
    "BLOCK_COLORS",
    "COLUMN_WIDTH",
    "METHOD_COLORS",
    "PALETTE",
    "TEXT_WIDTH",
    "block_color",
    "distinct_colors",
    "method_color",
    "paper_style",
    "savefig",
]

PALETTE: dict[str, str] = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "green": "#009E73",
    "orange": "#E69F00",
    "purple": "#CC79A7",
    "skyblue": "#56B4E9",
    "yellow": "#F0E442",
    "black": "#000000",
}
"""Okabe-Ito colors by name."""

_CYCLE = [
    PALETTE[k] for k in ("blue", "vermillion", "green", "orange", "purple", "skyblue", "black")
]
# yellow is left out of automatic choices: too light on white for thin lines.

METHOD_COLORS: dict[str, str] = {name: m.color for name, m in METHODS.items()}
"""Each registered method's colour, read from the registry (``smoothlab.methods.Method.color``);
hybrid variants are warm, ZO blue, first-order green/black. Not a second table: a method and
its colour are added with ``smoothlab.methods.register``."""

BLOCK_COLORS: dict[str, str] = {
    "base": PALETTE["blue"],
    "peft": PALETTE["vermillion"],
    "model": PALETTE["black"],
}

COLUMN_WIDTH = 3.25
"""Width in inches of one column of a two-column paper (ICLR/NeurIPS single column is
5.5 in, :data:`TEXT_WIDTH`)."""
TEXT_WIDTH = 5.5

RC: dict[str, object] = {
    "font.family": "serif",
    "font.serif": ["Times New Roman", "Times", "Nimbus Roman", "STIXGeneral", "DejaVu Serif"],
    "mathtext.fontset": "stix",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "lines.linewidth": 1.2,
    "lines.markersize": 3,
    "legend.frameon": False,
    "legend.handlelength": 1.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "xtick.minor.size": 1.5,
    "ytick.minor.size": 1.5,
    "figure.dpi": 100,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,  # TrueType in PDFs, as publishers ask
    "ps.fonttype": 42,
    "axes.prop_cycle": matplotlib.cycler(color=_CYCLE),
}
"""The rcParams of the paper style (applied only inside :func:`paper_style`)."""


@contextmanager
def paper_style() -> Iterator[None]:
    """Apply :data:`RC` for the duration of a ``with`` block, leaving global state alone."""
    import logging

    # Missing serif fonts fall back silently to DejaVu Serif; do not spam the log.
    logger = logging.getLogger("matplotlib.font_manager")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with plt.rc_context(RC):
            yield
    finally:
        logger.setLevel(level)


def _hashed(name: str) -> str:
    return _CYCLE[zlib.crc32(name.encode()) % len(_CYCLE)]


def method_color(method: str) -> str:
    """The color of a method (or any run label), the same in every figure.

    A registered method (or a label starting with one and a space or ``/``) gets its
    registry colour, read when called, so methods registered later are included.
    """
    key = str(method).strip().lower()
    colors = {name: m.color for name, m in METHODS.items()}
    if key in colors:
        return colors[key]
    for known, color in colors.items():  # "hybrid-lora (seed 1)" -> hybrid-lora
        if key.startswith(known + " ") or key.startswith(known + "/"):
            return color
    return _hashed(key)


def distinct_colors(keys: Mapping[str, str]) -> dict[str, str]:
    """``{label: color}`` for the curves of one figure: each label's :func:`method_color`
    (of its key, e.g. the method), unless an earlier label took it, in which case the first
    colour of the cycle not yet used (two runs of one method, or two labels whose hashed
    colours collide, would otherwise be two lines alike). Past seven curves colours repeat."""
    out: dict[str, str] = {}
    for label, key in keys.items():
        color = method_color(key)
        if color in out.values():
            color = next((c for c in _CYCLE if c not in out.values()), color)
        out[label] = color
    return out


def block_color(block: str) -> str:
    """The color of a parameter block (``base`` blue, ``peft`` vermillion, others hashed)."""
    return BLOCK_COLORS.get(block, _hashed(str(block)))


def savefig(fig: Figure, out_stem: str | Path) -> list[Path]:
    """Write ``fig`` as ``<out_stem>.png`` (200 dpi) and ``<out_stem>.pdf``.

    Parent folders are created; a ``.png``/``.pdf`` suffix on ``out_stem`` is dropped.
    The PDF carries no creation date, so identical figures give identical files.
    Returns the written paths ``[png, pdf]``.
    """
    stem = Path(out_stem)
    if stem.suffix.lower() in (".png", ".pdf"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    png = stem.parent / (stem.name + ".png")
    pdf = stem.parent / (stem.name + ".pdf")
    kw = {"bbox_inches": "tight", "pad_inches": 0.02}
    fig.savefig(png, dpi=200, metadata={"Software": None}, **kw)
    fig.savefig(pdf, metadata={"CreationDate": None, "Creator": None, "Producer": None}, **kw)
    return [png, pdf]
