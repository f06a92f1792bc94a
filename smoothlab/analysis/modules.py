"""Per-module smoothness: grouping recorded blocks into x (base-model) and y (PEFT) modules.

A recorder asked for per-module blocks (``--record-blocks layers``, ``kinds`` or globs,
split on both sides) names each block ``<side prefix><separator><module>``:
``base.layer.3`` is module ``layer.3`` of the zeroth-order block x, ``peft.layer.3`` the
same layer's share of the first-order block y. The rule is :func:`module_side`; the whole
blocks ``base``/``peft`` (and any other name) are not modules.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from smoothlab.errors import UsageError

__all__ = [
    "MODULE_SEPARATORS",
    "X_PREFIX",
    "Y_PREFIX",
    "module_frame",
    "module_matrix",
    "module_side",
    "natural_key",
]

X_PREFIX = "base"
"""Block-name prefix of the x (zeroth-order, base-model) modules."""
Y_PREFIX = "peft"
"""Block-name prefix of the y (first-order, PEFT) modules."""
MODULE_SEPARATORS = (".", "/", ":")
"""Characters allowed between the side prefix and the module name."""


def module_side(
    block: str, x_prefix: str = X_PREFIX, y_prefix: str = Y_PREFIX
) -> tuple[str, str] | None:
    """``("x", module)`` or ``("y", module)`` for a per-module block name, else ``None``.

    ``block`` is an x module when it is ``x_prefix + sep + module`` with ``sep`` one of
    :data:`MODULE_SEPARATORS` and ``module`` non-empty; likewise for y. So
    ``"base.layer.3" -> ("x", "layer.3")``, ``"peft/attention" -> ("y", "attention")``,
    while ``"base"``, ``"peft"``, ``"baseline.0"`` and ``"layer.3"`` give ``None``.
    """
    name = str(block)
    for side, prefix in (("x", x_prefix), ("y", y_prefix)):
        rest = name[len(prefix) :]
        if name.startswith(prefix) and len(rest) > 1 and rest[0] in MODULE_SEPARATORS:
            return side, rest[1:]
    return None


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded integers by value: ``layer.2`` before ``layer.10``."""
    parts = re.split(r"(\d+)", str(name))
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p)


def module_frame(
    smoothness: pd.DataFrame, x_prefix: str = X_PREFIX, y_prefix: str = Y_PREFIX
) -> pd.DataFrame:
    """The per-module rows of a smoothness frame, probes of one module at one step averaged.

    Columns ``side`` (``"x"``/``"y"``), ``module``, ``block``, ``step``, ``estimate`` (mean
    ``L`` over the probes at that step) and ``stderr`` (``sqrt(Σ se_i²)/k``, the standard
    error of that mean, nan if any se_i is missing); rows sorted by side, module
    (:func:`natural_key`) and step. Only finite estimates are used; the frame is empty when
    no block is a module.
    """
    cols = ["side", "module", "block", "step", "estimate", "stderr"]
    df = smoothness
    sides = {b: module_side(b, x_prefix, y_prefix) for b in pd.unique(df["block"].dropna())}
    sides = {b: s for b, s in sides.items() if s is not None}
    est = pd.to_numeric(df["estimate"], errors="coerce").astype("float64")
    df = df[df["block"].isin(list(sides)) & np.isfinite(est)]
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    se = df["stderr"] if "stderr" in df else pd.Series(np.nan, index=df.index)
    tmp = pd.DataFrame(
        {"block": df["block"], "step": df["step"], "estimate": df["estimate"], "se2": se**2}
    )
    agg = tmp.groupby(["block", "step"], sort=False).agg(
        estimate=("estimate", "mean"),
        se2=("se2", "sum"),
        n_se=("se2", "count"),
        k=("estimate", "size"),
    )
    # the mean's stderr needs every probe's: a missing one is unknown, not 0
    agg["stderr"] = np.where(agg["n_se"] == agg["k"], np.sqrt(agg["se2"]) / agg["k"], np.nan)
    out = agg.reset_index()
    out["side"] = [sides[b][0] for b in out["block"]]
    out["module"] = [sides[b][1] for b in out["block"]]
    order = sorted(set(zip(out["side"], out["module"])), key=lambda t: (t[0], natural_key(t[1])))
    rank = {t: i for i, t in enumerate(order)}
    out["_rank"] = [rank[t] for t in zip(out["side"], out["module"])]
    out = out.sort_values(["_rank", "step"], kind="stable")
    return out[cols].reset_index(drop=True)


def module_matrix(
    smoothness: pd.DataFrame,
    side: str,
    x_prefix: str = X_PREFIX,
    y_prefix: str = Y_PREFIX,
) -> pd.DataFrame:
    """``L`` of the ``side`` (``"x"`` or ``"y"``) modules as a module × step matrix.

    Index: the modules in :func:`natural_key` order (``layer.0, layer.1, ..., layer.11``);
    columns: the probe steps, ascending; cell: the mean estimate of that module at that
    step, NaN where it was not probed. Empty when ``side`` has no modules.
    """
    if side not in ("x", "y"):
        raise UsageError(f"side={side!r}; expected 'x' or 'y'")
    mf = module_frame(smoothness, x_prefix, y_prefix)
    mf = mf[mf["side"] == side]
    if mf.empty:
        return pd.DataFrame(dtype="float64")
    wide = mf.pivot(index="module", columns="step", values="estimate")
    modules = sorted(wide.index, key=natural_key)
    return wide.loc[modules, sorted(wide.columns)].astype("float64")
