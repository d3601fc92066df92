"""Fitting where no exact move exists: calibration data, activation capture, layer refits, synthetic inputs."""
