"""Answering before-or-after by training: data sets and the experiment."""

from .data import Dataset, load_dataset
from .experiment import ExperimentResult, experiment
from .jobs import EpochRecord
from .runs import RunFinished, RunStarted

__all__ = [
    "Dataset",
    "EpochRecord",
    "ExperimentResult",
    "RunFinished",
    "RunStarted",
    "experiment",
    "load_dataset",
]
