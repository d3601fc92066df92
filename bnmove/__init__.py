"""bnmove: move BatchNorm before or after its activation in any PyTorch model.

>>> import bnmove
>>> pairs = bnmove.find_pairs(model)
>>> result = bnmove.convert(model, "after", method="exact")
>>> result.model, result.verification.max_abs_error
"""

from .conversion import Conversion, Move, convert
from .detect import Detection, Pair, detect, find_pairs
from .errors import BnmoveError, LoadError, ModelRunError, VerificationError
from .loading import LoadedModel, load_model
from .patterns import ACTIVATION_KINDS
from .verify import Deviation, compare_models, infer_example_inputs

__version__ = "0.1.0"

__all__ = [
    "ACTIVATION_KINDS",
    "BnmoveError",
    "Conversion",
    "Detection",
    "Deviation",
    "LoadError",
    "LoadedModel",
    "ModelRunError",
    "Move",
    "Pair",
    "VerificationError",
    "__version__",
    "compare_models",
    "convert",
    "detect",
    "find_pairs",
    "infer_example_inputs",
    "load_model",
]
