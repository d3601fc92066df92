"""Answering before-or-after by training: data sets and the experiment."""

from .data import Dataset, load_dataset
from .experiment import Execution, ExperimentResult, Training, experiment
from .jobs import EpochRecord
from .runs import RunFinished, RunStarted

__all__ = [
    "Dataset",
    "EpochRecord",
    "Execution",
    "ExperimentResult",
    "RunFinished",
    "RunStarted",
    "Training",
    "experiment",
    "load_dataset",
]
