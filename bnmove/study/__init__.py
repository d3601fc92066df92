"""Answering before-or-after by training: data sets, the experiment, the demo."""
