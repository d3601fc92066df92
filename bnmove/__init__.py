"""bnmove: move BatchNorm before or after its activation in any PyTorch model.

>>> import bnmove
>>> pairs = bnmove.find_pairs(model)
>>> result = bnmove.convert(model, "after", method="exact")
>>> fitted = bnmove.convert(model, "after", method="fit", data_free="synthetic")
>>> result.model, result.verification.max_abs_error
>>> bnmove.export_variants(model, (x,), "variants/")
>>> bnmove.compare(["variants/"], provider="auto")
"""

from . import sample_models
from .conversion import Conversion, Move, convert
from .data import Dataset, load_dataset
from .detect import Detection, Pair, detect, find_pairs
from .errors import BnmoveError, LoadError, ModelRunError, VerificationError
from .experiment import ExperimentResult, experiment
from .export import export_variants
from .folding import Folding, fold_forward
from .loading import LoadedModel, load_model
from .patterns import ACTIVATION_KINDS
from .runtime import Comparison, compare, select_provider
from .synthetic import synthesize_inputs
from .verify import Deviation, compare_models, infer_example_inputs

__version__ = "0.1.0"

__all__ = [
    "ACTIVATION_KINDS",
    "BnmoveError",
    "Comparison",
    "Conversion",
    "Dataset",
    "Detection",
    "Deviation",
    "ExperimentResult",
    "Folding",
    "LoadError",
    "LoadedModel",
    "ModelRunError",
    "Move",
    "Pair",
    "VerificationError",
    "__version__",
    "compare",
    "compare_models",
    "convert",
    "detect",
    "experiment",
    "export_variants",
    "find_pairs",
    "fold_forward",
    "infer_example_inputs",
    "load_dataset",
    "load_model",
    "sample_models",
    "select_provider",
    "synthesize_inputs",
]
