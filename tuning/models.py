"""Pick and use models from MLflow: `python -m tuning.models list|evaluate|predict|promote`.

    python -m tuning.models list                                   # trials of every search, best first
    python -m tuning.models evaluate models:/allconv-cifar10@champion --dataset folder --data DIR
    python -m tuning.models predict models:/allconv-cifar10@champion cat.png dog.jpg
    python -m tuning.models promote 3                              # version 3 becomes the champion
    python -m tuning.models promote RUN_ID                         # the version logged by that run

Any `models:/NAME/VERSION`, `models:/NAME@ALIAS` or `runs:/RUN_ID/model` URI works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch
from mlflow import MlflowClient

from tuning.config import METRIC
from tuning.data import DataError, decode_rgb, load_data, to_model_input
from tuning.tracking import CHAMPION, DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL, tracking_uri

EVAL_BATCH = 1000


class ModelError(RuntimeError):
    """A model URI or version that cannot be used."""


def load(uri: str, tracking: str):
    mlflow.set_tracking_uri(tracking)
    try:
        info = mlflow.models.get_model_info(uri)
        model = mlflow.pytorch.load_model(uri, map_location="cpu")  # logged in eval mode
    except Exception as err:
        raise ModelError(f"cannot load model {uri} from {tracking} ({type(err).__name__}: {str(err)[:300]})") from err
    size = info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"][-1] if info.signature else None
    classes = (info.metadata or {}).get("classes") or []
    return model, size, classes


def list_trials(args) -> None:
    client = MlflowClient(args.tracking)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise ModelError(f"no MLflow experiment {args.experiment!r} in {args.tracking}")
    runs = client.search_runs([experiment.experiment_id], "tags.role = 'trial'", order_by=[f"metrics.{METRIC} DESC"], max_results=args.top)
    print(f"{'search':24s} {'trial':16s} {METRIC:>8s} {'epochs':>6s}  {'state':14s} config")
    for run in runs:
        tags, params = run.data.tags, run.data.params
        config = ", ".join(f"{k}={params[k]}" for k in ("preset", "lr", "width_mult", "batchnorm", "downsample", "batch_size") if k in params)
        acc = run.data.metrics.get(METRIC)
        print(f"{tags.get('search', '-'):24s} {run.info.run_name:16s} {acc if acc is None else f'{acc:.2%}':>8} "
              f"{tags.get('epochs_run', '-'):>6s}  {tags.get('end_state', run.info.status.lower()):14s} {config}")  # fmt: skip
    try:
        versions = client.search_model_versions(f"name = '{args.registered_model}'")
    except Exception:
        versions = []
    for found in sorted(versions, key=lambda v: int(v.version)):
        version = client.get_model_version(found.name, found.version)  # search results omit aliases
        alias = f" @{', @'.join(version.aliases)}" if version.aliases else ""
        print(f"models:/{version.name}/{version.version}{alias}  test_acc {version.tags.get('test_acc', '?')}")


def evaluate(args) -> None:
    model, size, classes = load(args.model_uri, args.tracking)
    test = load_data(args.dataset, args.data).test
    predictions = []
    with torch.no_grad():
        for start in range(0, len(test), EVAL_BATCH):
            predictions.append(model(to_model_input(test.images[start : start + EVAL_BATCH], size)).argmax(1))
    predicted = torch.cat(predictions)
    n = max(len(classes), int(test.labels.max()) + 1)
    confusion = torch.bincount(test.labels * n + predicted, minlength=n * n).view(n, n)
    names = classes or [str(i) for i in range(n)]
    print(f"test accuracy {confusion.diag().sum().item() / len(test):.2%} on {len(test)} images ({args.model_uri})")
    for i, name in enumerate(names):
        print(f"  {name:14s} {confusion[i, i].item() / max(1, confusion[i].sum().item()):7.2%}")
    out = Path(args.out)
    plot_confusion(confusion, names, out)
    print(f"confusion matrix: {out}")


def plot_confusion(confusion: torch.Tensor, names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    figure.tight_layout()
    figure.savefig(out)


def predict(args) -> None:
    model, size, classes = load(args.model_uri, args.tracking)
    for path in args.images:
        with torch.no_grad():
            probabilities = model(to_model_input(decode_rgb(Path(path), size).unsqueeze(0), None)).softmax(1)[0]
        p, index = probabilities.max(0)
        label = classes[index] if index < len(classes) else str(int(index))
        print(f"{path}: {label} ({p.item():.1%})")


def promote(args) -> None:
    client = MlflowClient(args.tracking)
    name, target = args.registered_model, args.run_or_version
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception as err:
        raise ModelError(f"no registered model {name!r} in {args.tracking} ({err})") from err
    match = [v for v in versions if str(v.version) == target or v.run_id == target]
    if not match:
        raise ModelError(f"{name} has no version {target!r} and no version logged by run {target!r}")
    version = str(match[0].version)
    client.set_registered_model_alias(name, CHAMPION, version)
    print(f"models:/{name}@{CHAMPION} -> version {version} (test_acc {match[0].tags.get('test_acc', '?')})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tuning.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", dest="tracking", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--registered-model", default=DEFAULT_REGISTERED_MODEL, help=f"default: {DEFAULT_REGISTERED_MODEL}")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="a leaderboard of trials across searches, and the registered versions")
    listing.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    listing.add_argument("--top", type=int, default=20)
    evaluating = commands.add_parser("evaluate", help="test accuracy, per-class accuracy and a confusion-matrix PNG")
    evaluating.add_argument("model_uri")
    evaluating.add_argument("--dataset", default="cifar10", choices=("cifar10", "folder"))
    evaluating.add_argument("--data", default="data")
    evaluating.add_argument("--out", default="confusion_matrix.png")
    predicting = commands.add_parser("predict", help="the class and its probability for each image")
    predicting.add_argument("model_uri")
    predicting.add_argument("images", nargs="+")
    promoting = commands.add_parser("promote", help=f"move the '{CHAMPION}' alias to a version (or to the version a run logged)")
    promoting.add_argument("run_or_version")
    args = parser.parse_args(argv)
    args.tracking = tracking_uri(args.tracking)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = {"list": list_trials, "evaluate": evaluate, "predict": predict, "promote": promote}[args.command]
    try:
        command(args)
    except (ModelError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
