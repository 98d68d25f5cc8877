import subprocess
import sys

import pytest
import torch

from tuning.config import METRIC, TrialConfig
from tuning.data import load_data, make_trial_data, train_batches
from tuning.training import (
    CHECKPOINT_FILE,
    CorruptCheckpointError,
    DivergedError,
    build_model,
    build_optimizer,
    build_scheduler,
    evaluate_split,
    fit,
    load_checkpoint,
    save_checkpoint,
    train_one_epoch,
)

CPU = torch.device("cpu")
REPEATABLE = ("train_loss", "val_loss", "val_acc", "lr")


@pytest.fixture
def trial_data(image_folder):
    return make_trial_data(load_data("folder", image_folder), val_size=9, seed=0)


def small_config(**overrides) -> TrialConfig:
    return TrialConfig.from_dict({"num_classes": 3, "batch_size": 9, "epochs": 4, "lr": 0.05, **overrides})


def test_training_learns_the_easy_classes(trial_data):
    cfg = small_config(epochs=6)
    history = [metrics for metrics, _ in fit(cfg, trial_data, CPU)]
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1][METRIC] >= 0.8
    assert all(m["images_per_s"] > 0 for m in history)


def test_train_one_epoch_and_evaluate_are_usable_alone(trial_data):
    cfg = small_config()
    model = build_model(cfg, trial_data.mean, trial_data.std, CPU)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=3)
    before = evaluate_split(model, trial_data.val, None)
    batches = train_batches(trial_data.train, 9, torch.Generator().manual_seed(0), augment=True, image_size=None)
    stats = train_one_epoch(model, optimizer, scheduler, batches)
    assert stats.images == 27 and stats.train_loss > 0 and stats.images_per_s > 0
    assert 0 <= before.accuracy <= 1 and before.loss > 0


def test_upsampled_training_runs_at_the_requested_size(trial_data):
    history = [m for m, _ in fit(small_config(epochs=1, image_size=32), trial_data, CPU)]
    assert len(history) == 1 and history[0]["train_loss"] > 0


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "cosine"), ("adamw", "step"), ("sgd", "onecycle")])
def test_every_optimizer_and_schedule_trains(trial_data, optimizer, schedule):
    cfg = small_config(optimizer=optimizer, lr_schedule=schedule, lr=0.01 if optimizer == "adamw" else 0.05)
    history = [m for m, _ in fit(cfg, trial_data, CPU)]
    assert history[-1]["lr"] < cfg.lr


def test_nan_loss_raises_diverged(trial_data):
    cfg = small_config()
    model = build_model(cfg, trial_data.mean, trial_data.std, CPU)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    optimizer = build_optimizer(model, cfg)
    batches = train_batches(trial_data.train, 9, torch.Generator(), augment=False, image_size=None)
    with pytest.raises(DivergedError, match="nan"):
        train_one_epoch(model, optimizer, build_scheduler(optimizer, cfg, 3), batches)


def test_resuming_after_epoch_2_repeats_epoch_3_exactly(trial_data, tmp_path):
    cfg = small_config(stage_dropout=0.2)  # dropout too, so its randomness must replay
    uninterrupted = [m for m, _ in fit(cfg, trial_data, CPU)]

    for metrics, payload in fit(cfg, trial_data, CPU):
        save_checkpoint(tmp_path, payload)
        if metrics["epoch"] == 2:
            break  # "interrupted"
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["epoch"] == 2 and TrialConfig.from_dict(checkpoint["config"]) == cfg
    resumed = [m for m, _ in fit(cfg, trial_data, CPU, checkpoint)]

    assert [m["epoch"] for m in resumed] == [3, 4]
    for key in REPEATABLE:
        assert resumed[0][key] == uninterrupted[2][key], key
        assert resumed[1][key] == uninterrupted[3][key], key


def test_checkpoint_is_written_atomically(trial_data, tmp_path):
    _, payload = next(fit(small_config(), trial_data, CPU))
    save_checkpoint(tmp_path / "ckpt", payload)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CHECKPOINT_FILE, "checkpoint.sha256"]  # no temp files
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert set(loaded) >= {"model", "optimizer", "scheduler", "epoch", "config"}


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], lambda b: b""],
    ids=["truncated", "one-bit-flipped", "empty"],
)
def test_a_damaged_checkpoint_is_never_loaded(trial_data, tmp_path, damage):
    _, payload = next(fit(small_config(), trial_data, CPU))
    path = save_checkpoint(tmp_path, payload)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptCheckpointError, match="checkpoint.pt is truncated or corrupt"):
        load_checkpoint(tmp_path)
    path.unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        load_checkpoint(tmp_path)


def test_command_line_trains_and_resumes(image_folder, tmp_path, trial_data):
    base = [sys.executable, "-m", "tuning.train", "--dataset", "folder", "--data", str(image_folder), "--val-size", "9"]
    fresh = subprocess.run([*base, "--batch-size", "9", "--epochs", "2"], capture_output=True, text=True, check=True)
    assert "epoch   2/2" in fresh.stdout and "val_acc" in fresh.stdout and "img/s" in fresh.stdout

    cfg = small_config(epochs=3)
    _, payload = next(fit(cfg, trial_data, CPU))
    save_checkpoint(tmp_path, payload)  # as if a run had stopped after epoch 1
    resumed = subprocess.run(
        [*base, "--checkpoint-dir", str(tmp_path), "--resume", "--test"], capture_output=True, text=True, check=True
    )
    assert "epoch   1/3" not in resumed.stdout
    assert "epoch   2/3" in resumed.stdout and "epoch   3/3" in resumed.stdout and "test_acc" in resumed.stdout
    assert load_checkpoint(tmp_path)["epoch"] == 3


def test_command_line_names_a_bad_flag_value(image_folder):
    result = subprocess.run(
        [sys.executable, "-m", "tuning.train", "--dataset", "folder", "--data", str(image_folder), "--lr", "-1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "lr" in result.stderr and "Traceback" not in result.stderr


def test_command_line_help_documents_every_flag():
    result = subprocess.run([sys.executable, "-m", "tuning.train", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--preset", "--epochs", "--lr", "--batchnorm", "--downsample", "--data", "--val-size", "--resume"):
        assert flag in result.stdout


@pytest.mark.slow
def test_compiled_trial_trains_like_eager_and_checkpoints_the_plain_net(trial_data):
    eager = [m for m, _ in fit(small_config(epochs=2), trial_data, CPU)]
    compiled_run = list(fit(small_config(epochs=2, compile=True), trial_data, CPU))
    compiled = [m for m, _ in compiled_run]
    for a, b in zip(eager, compiled):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 and abs(a["val_loss"] - b["val_loss"]) < 0.05
    state = compiled_run[-1][1]["model"]
    assert not any(key.startswith("_orig_mod") for key in state)  # loads into a plain AllConvNet
    build_model(small_config(), trial_data.mean, trial_data.std, CPU).load_state_dict(state)
