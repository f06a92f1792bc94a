"""The registry of fine-tuning methods: the one place a method is declared.

A method says which weights learn from zeroth-order (SPSA) estimates — ``x`` — and which
from gradients — ``y`` — and which PEFT module (if any) it attaches. The CLI's choices and
help, the figures' colours, the benches' learning-rate grids and the training loop's
parameter split all read this table, so adding a method is one :func:`register` call plus
its own code (for a new PEFT kind: an attach function registered in ``hybrid``).

This module imports nothing but the standard library, so ``analysis`` and ``figures`` can
read it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError

__all__ = ["METHODS", "Method", "get_method", "method_names", "peft_kinds", "register"]

# Okabe & Ito (2008) colors, repeated here only by value so this module stays dependency-free.
_BLUE, _VERMILLION, _GREEN, _ORANGE = "#0072B2", "#D55E00", "#009E73", "#E69F00"
_PURPLE, _SKYBLUE, _BLACK, _WINE = "#CC79A7", "#56B4E9", "#000000", "#882255"


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    ``zo``: which weights form the zeroth-order block x — ``"all"`` (every weight), ``"base"``
    (every weight of the pretrained model, i.e. all but the PEFT module) or ``"none"``.
    ``fo``: which weights form the first-order block y — ``"all"``, ``"peft"`` (the PEFT
    module, with any head it trains) or ``"none"``. ``peft``: the PEFT kind attached, or None.
    ``grid``: the learning rates a bench searches, ``{"lr_base": [...], "lr_peft": [...]}``.
    """

    name: str
    zo: str
    fo: str
    peft: str | None = None
    color: str = _BLACK
    label: str = ""
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zo not in ("all", "base", "none") or self.fo not in ("all", "peft", "none"):
            raise ValueError(
                f"method {self.name!r}: zo must be all/base/none and fo all/peft/none, got {self.zo!r}/{self.fo!r}"
            )
        if (self.zo == "base" or self.fo == "peft") and not self.peft:
            raise ValueError(
                f"method {self.name!r} splits base/peft weights but attaches no PEFT module"
            )
        if self.zo == "none" and self.fo == "none":
            raise ValueError(f"method {self.name!r} trains nothing")

    @property
    def has_zo(self) -> bool:
        """Whether a block learns from SPSA estimates (needs ``lr_base``)."""
        return self.zo != "none"

    @property
    def has_fo(self) -> bool:
        """Whether a block learns from gradients (needs ``lr_peft``)."""
        return self.fo != "none"


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a name may be registered once)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; :class:`UsageError` (a ValueError) naming the accepted
    ones otherwise (a bad method is the user's input: the CLI prints it as one line)."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}") from None


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(METHODS)


def peft_kinds() -> tuple[str, ...]:
    """PEFT kinds some method attaches, in registration order."""
    return tuple(dict.fromkeys(m.peft for m in METHODS.values() if m.peft))


_PEFT_LR = (0.01, 0.03, 0.1, 0.3, 1.0)  # plain SGD (no momentum): PEFT rates must be large
_BASE_LR = (1e-6, 1e-5, 1e-4, 1e-3)
# encoder prefixes get tiny gradients (a fresh head, std 0.02): plain SGD moves them only at
# rates of 1e2-1e3 (measured on MiniLM + SST-2, tests/test_encoder_prefix.py)
_PREFIX_LR = (0.1, 1.0, 10.0, 100.0, 1000.0)

register(
    Method(
        "zo-ft",
        zo="all",
        fo="none",
        color=_BLUE,
        label="ZO full fine-tuning (MeZO)",
        grid={"lr_base": _BASE_LR},
    )
)
register(
    Method(
        "fo-ft",
        zo="none",
        fo="all",
        color=_BLACK,
        label="first-order full fine-tuning",
        grid={"lr_peft": (1e-3, 1e-2, 5e-2, 0.1)},
    )
)
_KINDS = (("lora", _GREEN, _VERMILLION), ("prompt", _SKYBLUE, _ORANGE), ("prefix", _WINE, _PURPLE))
for _kind, _color, _ in _KINDS:
    _lr = _PREFIX_LR if _kind == "prefix" else _PEFT_LR
    register(
        Method(
            f"fo-{_kind}",
            zo="none",
            fo="peft",
            peft=_kind,
            color=_color,
            label=f"first-order {_kind}",
            grid={"lr_peft": _lr},
        )
    )
for _kind, _, _color in _KINDS:
    register(
        Method(
            f"hybrid-{_kind}",
            zo="base",
            fo="peft",
            peft=_kind,
            color=_color,
            label=f"hybrid ZO base + first-order {_kind}",
            grid={"lr_base": _BASE_LR, "lr_peft": _PREFIX_LR if _kind == "prefix" else _PEFT_LR},
        )
    )
