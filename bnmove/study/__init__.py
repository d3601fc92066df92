"""Answering before-or-after by training: data sets and the experiment."""

from .data import Dataset, load_dataset
from .experiment import ExperimentResult, experiment

__all__ = ["Dataset", "ExperimentResult", "experiment", "load_dataset"]
