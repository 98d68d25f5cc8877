"""Figures of a finished search, for the parent run: how the search went and what mattered."""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")  # files only; the driver may run on a head node with no display

import matplotlib.pyplot as plt
import numpy as np
import optuna
from matplotlib.figure import Figure
from ray import tune

from tuning.config import METRIC
from tuning.spaces import SearchSpace


def histories(results: Iterable[tune.Result]) -> list[tuple[dict, list[int], list[float]]]:
    """(config, epochs, val_acc per epoch) for each trial with a score, in trial order. A diverged
    epoch's NaN is left out: it has no place on an accuracy axis, and Optuna refuses it."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or METRIC not in frame:
            continue
        scored = frame[np.isfinite(frame[METRIC].astype(float))]
        if len(scored):
            rows.append((result.config, scored["epoch"].astype(int).tolist(), scored[METRIC].astype(float).tolist()))
    return rows


def optimisation_history(trials) -> Figure:
    figure, ax = plt.subplots(figsize=(7, 4))
    best = [max(accs) for _, _, accs in trials]
    running = [max(best[: i + 1]) for i in range(len(best))]
    ax.scatter(range(1, len(best) + 1), best, s=18, label=f"trial's best {METRIC}")
    ax.step(range(1, len(best) + 1), running, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=METRIC, title="Optimisation history")
    ax.legend()
    return figure


def learning_curves(trials, max_epochs: int) -> Figure:
    figure, ax = plt.subplots(figsize=(7, 4))
    for _, epochs, accs in trials:
        stopped = epochs[-1] < max_epochs
        ax.plot(epochs, accs, marker="x" if stopped else "o", markersize=4, alpha=0.8, linestyle="--" if stopped else "-")
    ax.set(xlabel="epoch", ylabel=METRIC, title="Learning curves (dashed: stopped early by ASHA)", xlim=(0.5, max_epochs + 0.5))
    return figure


def param_importances(trials, space: SearchSpace) -> Figure:
    """Optuna's importance estimate over the params every trial shares."""
    figure, ax = plt.subplots(figsize=(7, 4))
    distributions = {dim.key: dim.optuna_distribution() for dim in space.dimensions if not dim.when}
    study = optuna.create_study(direction="maximize")
    for config, _, accs in trials:
        params = {k: config[k] for k in distributions if k in config}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: distributions[k] for k in params}, value=max(accs)))
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as err:  # too few trials, or no spread in the values
        ax.text(0.5, 0.5, f"not enough trials to estimate ({err})", ha="center", wrap=True)
        return figure
    keys = list(importances)[::-1]
    ax.barh(keys, [importances[k] for k in keys])
    ax.set(xlabel="importance", title=f"Parameter importances for {METRIC}")
    return figure


def parallel_coordinates(trials, space: SearchSpace) -> Figure:
    """Every trial as a line across its params (each scaled to [0, 1]), coloured by its best val_acc."""
    figure, ax = plt.subplots(figsize=(8, 4))
    dims = list(space.dimensions)
    best = [max(accs) for _, _, accs in trials]
    low, high = min(best), max(best)
    cmap = plt.get_cmap("viridis")
    for (config, _, _), acc in zip(trials, best):
        ys = [dim.position(config.get(dim.key)) for dim in dims] + [(acc - low) / ((high - low) or 1)]
        ax.plot(range(len(ys)), ys, color=cmap((acc - low) / ((high - low) or 1)), alpha=0.8)
    ax.set_xticks(range(len(dims) + 1), [d.key for d in dims] + [METRIC], rotation=20)
    ax.set(ylim=(-0.05, 1.05), yticks=[], title=f"Parallel coordinates (colour: {METRIC})")
    return figure


def search_plots(results: Iterable[tune.Result], space: SearchSpace, max_epochs: int) -> dict[str, Figure]:
    trials = histories(results)
    if not trials:
        return {}
    return {
        "optimisation_history": optimisation_history(trials),
        "learning_curves": learning_curves(trials, max_epochs),
        "param_importances": param_importances(trials, space),
        "parallel_coordinates": parallel_coordinates(trials, space),
    }
