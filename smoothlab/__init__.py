"""smoothlab: block-wise local smoothness of fine-tuning losses.

``import smoothlab`` loads only torch, numpy and scipy; transformers, peft and the training
engine live in the ``hybrid`` package.
"""

from .blocks import block_sizes, make_blocks, peft_parameter_names
from .estimate import Estimate
from .estimators import NORMS
from .hvp import HVPS, Oracle
from .perturb import seeded_gaussian, shifted
from .probe import ModelLoss, eval_mode, probe, probe_model

__version__ = "0.1.0"

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
