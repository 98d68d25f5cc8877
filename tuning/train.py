"""Train one config by hand: `python -m tuning.train --preset seed --epochs 3 --data DIR`.

The quickest way to try a config before searching: the same data pipeline, model and epoch
loop as a search trial, with no Ray and no MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from model import parameter_count
from tuning.config import PARAMS, TrialConfig
from tuning.data import DataError, add_data_arguments, trial_data_from_args
from tuning.training import CorruptCheckpointError, DivergedError, fit, load_checkpoint, pick_device, save_checkpoint, test_accuracy


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrialConfig key; unset flags keep the config's (or the preset's) default."""
    group = parser.add_argument_group("trial config (defaults: see tuning/config.py)")
    for key, param in PARAMS.items():
        if key == "num_classes":  # always the data's
            continue
        flag = "--" + key.replace("_", "-")
        if param.kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=param.help)
        elif param.choices:
            group.add_argument(flag, choices=param.choices, default=None, help=param.help)
        else:
            group.add_argument(flag, type=param.kind, default=None, help=f"{param.help} {param.describe_range()}")


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    return TrialConfig.from_dict({key: value for key in PARAMS if (value := getattr(args, key, None)) is not None})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tuning.train", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="write a checkpoint here after every epoch")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir, with its config"
    )
    parser.add_argument("--test", action="store_true", help="report test-split accuracy at the end")
    args = parser.parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint_dir) if args.resume else None
        # A resumed run keeps its own config: a new one would bend the lr schedule mid-run.
        cfg = TrialConfig.from_dict(checkpoint["config"]) if checkpoint else config_from_args(args)
        data = trial_data_from_args(args)
        cfg = dataclasses.replace(cfg, num_classes=len(data.classes))
    except (DataError, CorruptCheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = pick_device()
    print(f"device {device} | train {len(data.train)} val {len(data.val)} test {len(data.test)} | {cfg}")
    last = None
    try:
        for metrics, payload in fit(cfg, data, device, checkpoint):
            print(
                f"epoch {metrics['epoch']:3d}/{cfg.epochs}  train_loss {metrics['train_loss']:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  val_acc {metrics['val_acc']:.2%}  "
                f"{metrics['images_per_s']:,.0f} img/s  {metrics['epoch_seconds']:.1f} s",
                flush=True,
            )
            if args.checkpoint_dir is not None:
                save_checkpoint(args.checkpoint_dir, payload)
            last = payload
    except DivergedError as err:
        print(f"error: diverged: {err}", file=sys.stderr)
        return 1
    if args.test and last is not None:
        model, accuracy = test_accuracy(last, data, device)
        print(f"parameters {parameter_count(model):,}  test_acc {accuracy:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
