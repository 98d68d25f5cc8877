"""Hyperparameter search for the all-convolutional net: data, trials, search and tracking."""
