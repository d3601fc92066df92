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

import importlib.metadata

from . import sample_models
from .analysis.detect import Pair
from .analysis.inputs import infer_example_inputs
from .analysis.patterns import ACTIVATION_KINDS
from .core.affine import ChannelAffine
from .core.fidelity import Deviation, compare_models
from .deploy.export import export_variants
from .deploy.folding import Folding, fold_forward
from .deploy.runtime import Comparison, compare, select_provider
from .errors import BnmoveError, LoadError, ModelRunError, VerificationError
from .fitting.calibrate import recalibrate
from .fitting.synthetic import synthesize_inputs
from .io.loading import LoadedModel, load_model
from .pipeline.analyse import Detection, detect, find_pairs
from .pipeline.conversion import convert
from .pipeline.results import Conversion, Move
from .study.data import Dataset, load_dataset
from .study.experiment import ExperimentResult, experiment

__version__ = importlib.metadata.version("bnmove")  # pyproject.toml holds the one version

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
