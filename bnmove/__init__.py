"""bnmove: move BatchNorm before or after its activation in any PyTorch model.

>>> import bnmove
>>> pairs = bnmove.find_pairs(model)
>>> result = bnmove.convert(model, "after", method="exact")
>>> fitted = bnmove.convert(model, "after", method="fit", data_free="synthetic")
>>> result.model, result.verification.max_abs_error
>>> bnmove.export_variants(model, (x,), "variants/")
>>> bnmove.compare(["variants/"], provider="auto")
>>> tuned = bnmove.recalibrate(fine_tuned, train_x)  # exact BN statistics after fine-tuning
"""

from . import sample_models
from .analysis.detect import Detection, Pair, detect, find_pairs
from .analysis.patterns import ACTIVATION_KINDS
from .deploy.export import export_variants
from .deploy.folding import Folding, fold_forward
from .deploy.runtime import Comparison, compare, select_provider
from .errors import BnmoveError, LoadError, ModelRunError, VerificationError
from .fitting.calibrate import recalibrate
from .fitting.synthetic import synthesize_inputs
from .io.loading import LoadedModel, load_model
from .moving.affine import ChannelAffine
from .moving.conversion import Conversion, Move, convert
from .moving.verify import Deviation, compare_models, infer_example_inputs
from .study.data import Dataset, load_dataset
from .study.experiment import ExperimentResult, experiment

__version__ = "0.1.0"

__all__ = [
    "ACTIVATION_KINDS",
    "BnmoveError",
    "ChannelAffine",
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
    "recalibrate",
    "sample_models",
    "select_provider",
    "synthesize_inputs",
]
