"""Datasets, their split into calibration and evaluation images, and preprocessing with an image cache."""
