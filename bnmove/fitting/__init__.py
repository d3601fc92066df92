"""Fitting where no exact move exists: calibration data, two-pass calibrated fits, layer refits, synthetic inputs."""
