"""The search's figures, drawn from Tune results shaped as a search leaves them."""

import math

import pandas as pd
from ray.tune import Result

from tuning.config import METRIC
from tuning.plots import histories, search_plots
from tuning.spaces import load_space


def trial_result(lr: float, accuracies: list[float]) -> Result:
    config = {"lr": lr, "width_mult": 0.5, "batch_size": 64, "preset": "seed"}
    frame = pd.DataFrame({"epoch": range(1, len(accuracies) + 1), METRIC: accuracies})
    return Result(metrics={"config": config}, checkpoint=None, error=None, path="", metrics_dataframe=frame)


def test_diverged_epochs_are_left_out_and_a_trial_with_none_scored_is_skipped():
    results = [
        trial_result(0.1, [0.3, 0.4]),
        trial_result(0.2, [0.35, math.nan]),  # diverged in epoch 2
        trial_result(0.9, [math.nan]),  # diverged in epoch 1: nothing to plot
        trial_result(0.05, [0.2, 0.25]),
    ]
    trials = histories(results)
    assert [config["lr"] for config, _, _ in trials] == [0.1, 0.2, 0.05]
    assert trials[1][1:] == ([1], [0.35])
    plots = search_plots(results, load_space("smoke"), max_epochs=2)
    assert set(plots) == {"optimisation_history", "learning_curves", "param_importances", "parallel_coordinates"}
