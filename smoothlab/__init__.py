"""smoothlab: block-wise local smoothness of fine-tuning losses.

``import smoothlab`` is lazy (PEP 562): the public names below are imported on first
attribute access, so ``import smoothlab.runlog`` or ``import smoothlab.methods`` loads no
torch. The core loads only torch, numpy and scipy; transformers, peft and the training
engine live in the ``smoothlab.hybrid`` subpackage, run-folder analysis in
``smoothlab.analysis`` and the figures and report in ``smoothlab.figures``.

``smoothlab.probe`` is the function :func:`smoothlab.probe.probe`, as with an eager
``from .probe import probe``; the module stays reachable as ``sys.modules["smoothlab.probe"]``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs only; nothing is imported at run time
    from .blocks import block_sizes, make_blocks, peft_parameter_names
    from .estimate import Estimate
    from .estimators import NORMS
    from .hvp import HVPS, Oracle
    from .perturb import seeded_gaussian, shifted
    from .probe import ModelLoss, eval_mode, probe, probe_model

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Estimate": "estimate",
    "HVPS": "hvp",
    "ModelLoss": "probe",
    "NORMS": "estimators",
    "Oracle": "hvp",
    "block_sizes": "blocks",
    "eval_mode": "probe",
    "make_blocks": "blocks",
    "peft_parameter_names": "blocks",
    "probe": "probe",
    "probe_model": "probe",
    "seeded_gaussian": "perturb",
    "shifted": "perturb",
}
"""Public name -> the submodule defining it."""

__all__ = [
    "Estimate",
    "HVPS",
    "ModelLoss",
    "NORMS",
    "Oracle",
    "block_sizes",
    "eval_mode",
    "make_blocks",
    "peft_parameter_names",
    "probe",
    "probe_model",
    "seeded_gaussian",
    "shifted",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'smoothlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps an exported function from being shadowed by its same-named submodule.

    Importing ``smoothlab.probe`` makes the import system set the package attribute
    ``probe`` to the submodule; for exported names this binds the exported object instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
