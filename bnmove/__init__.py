"""bnmove: move BatchNorm before or after its activation in any PyTorch model.

>>> import bnmove
>>> pairs = bnmove.find_pairs(model)
>>> result = bnmove.convert(model, "after", method="exact")
>>> fitted = bnmove.convert(model, "after", method="fit", calibration=bnmove.Calibration(data_free="synthetic"))
>>> result.model, result.verification.max_abs_error
>>> bnmove.export_variants(model, (x,), "variants/", options=bnmove.ExportOptions(fold="padded"))
>>> bnmove.compare(["variants/"], provider="auto")
>>> tuned = bnmove.recalibrate(fine_tuned, train_x)  # exact BN statistics after fine-tuning

What only some scripts need has its own namespace: ``bnmove.deploy`` (forward
folds, providers), ``bnmove.study`` (data sets), ``bnmove.core`` (the kept
affine layer, verification).
"""

import importlib.metadata

from . import sample_models
from .analysis.detect import Pair
from .core.progress import Stage
from .deploy.comparison import Comparison
from .deploy.export import ExportOptions, export_variants
from .deploy.runtime import compare
from .errors import BnmoveError, LoadError, ModelRunError, VerificationError
from .fitting.calibrate import recalibrate
from .io.loading import LoadedModel, load_model
from .pipeline.analyse import Detection, detect, find_pairs
from .pipeline.calibration import Calibration
from .pipeline.conversion import convert
from .pipeline.results import Conversion, Move
from .study.experiment import ExperimentResult, experiment

__version__ = importlib.metadata.version("bnmove")  # pyproject.toml holds the one version

__all__ = [
    "BnmoveError",
    "Calibration",
    "Comparison",
    "Conversion",
    "Detection",
    "ExperimentResult",
    "ExportOptions",
    "LoadError",
    "LoadedModel",
    "ModelRunError",
    "Move",
    "Pair",
    "Stage",
    "VerificationError",
    "__version__",
    "compare",
    "convert",
    "detect",
    "experiment",
    "export_variants",
    "find_pairs",
    "load_model",
    "recalibrate",
    "sample_models",
]
