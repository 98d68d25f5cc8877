"""MLflow: a parent run per search, a child per trial, plots, and the registered champion."""

import shutil
import subprocess
import sys
import time

import pytest
import ray
import torch
from mlflow import MlflowClient

from model import AllConvNet, preset
from tests.helpers import TrackingServer
from tuning.search import main
from tuning.tracking import CHAMPION, SearchTracker, check_reachable, register_champion, TrackingError


def test_an_unreachable_tracking_server_is_one_clear_error_before_ray(image_folder, tmp_path, capsys):
    started = time.time()
    argv = ["--tracking-uri", "http://127.0.0.1:9", "--dataset", "folder", "--data", str(image_folder),
            "--num-gpus", "0", "--storage-path", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9" in err and "unreachable" in err and err.count("error:") == 1
    assert time.time() - started < 30 and not ray.is_initialized()


def test_an_unwritable_sqlite_folder_is_named(tmp_path):
    with pytest.raises(TrackingError, match="missing or not writable"):
        check_reachable(f"sqlite:///{tmp_path}/no/such/dir/mlflow.db")


@pytest.mark.slow  # three model exports
def test_the_champion_moves_only_for_a_better_test_accuracy(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SearchTracker(uri, "champions", "s1", 1, str(tmp_path))
    model = AllConvNet(preset("seed", width_mult=0.25))
    example = torch.rand(2, 3, 32, 32).numpy()
    first = register_champion(uri, tracker.parent_run_id, model, example, 0.60, "m")
    worse = register_champion(uri, tracker.parent_run_id, model, example, 0.55, "m")
    better = register_champion(uri, tracker.parent_run_id, model, example, 0.70, "m")
    assert (first["champion"], worse["champion"], better["champion"]) == (True, False, True)
    assert str(MlflowClient(uri).get_model_version_by_alias("m", CHAMPION).version) == better["version"] == "3"


@pytest.mark.slow
def test_a_search_is_one_parent_run_with_a_child_per_trial_and_a_champion(smoke_search, cifar_jpeg_dir):
    uri, summary = smoke_search.uri, smoke_search.summary
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e").experiment_id
    runs = client.search_runs([experiment], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 8 == len(runs) - 1

    for child in children:
        tags = child.data.tags
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert [m.step for m in history] == list(range(1, int(tags["epochs_run"]) + 1))
        assert child.info.status == "FINISHED" and tags["device"] == "cpu" and "lr" in child.data.params
        if tags["end_state"] == "stopped_early":
            assert int(tags["stopped_at_epoch"]) == len(history) < 3
        else:
            assert tags["end_state"] == "completed" and len(history) == 3
    assert sum(c.data.tags["end_state"] == "stopped_early" for c in children) == summary["stopped_early"]

    parent = parents[0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")
    }
    assert {"search_space.yaml", "leaderboard.csv", "cli_args.json"} <= artifacts
    assert {f"plots/{name}.png" for name in ("optimisation_history", "learning_curves", "param_importances", "parallel_coordinates")} <= artifacts
    assert parent.data.metrics["best_test_acc"] == pytest.approx(summary["best"]["test_acc"])
    assert parent.info.status == "FINISHED"

    version = client.get_model_version_by_alias("allconv-test", CHAMPION)
    logged = float(version.tags["test_acc"])
    assert logged == pytest.approx(summary["best"]["test_acc"], abs=1e-6)
    # A fresh process, with nothing from us but the URI: the champion gives the logged accuracy.
    script = f"""
import mlflow, mlflow.pytorch, torch
from tuning.data import load_data
mlflow.set_tracking_uri({uri!r})
model = mlflow.pytorch.load_model("models:/allconv-test@{CHAMPION}")
test = load_data("folder", {str(cifar_jpeg_dir)!r}).test
with torch.no_grad():
    correct = sum((model(test.images[i:i + 1000].float() / 255).argmax(1) == test.labels[i:i + 1000]).sum().item()
                  for i in range(0, len(test.labels), 1000))
print(correct / len(test.labels))
"""
    reloaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    assert abs(float(reloaded.stdout.strip().splitlines()[-1]) - logged) <= 0.0005


@pytest.fixture
def mlflow_ui(smoke_search):
    """`mlflow server` on localhost over the search's store; yields its address."""
    server = TrackingServer(smoke_search.uri)
    server.start()
    yield server.uri
    server.stop()


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000"]  # fmt: skip


@pytest.mark.slow
def test_the_ui_lists_the_parent_run_and_its_children(mlflow_ui, smoke_search, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    experiment = MlflowClient(smoke_search.uri).get_experiment_by_name("e2e").experiment_id
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    try:
        browser.get(f"{mlflow_ui}/#/experiments/{experiment}/runs")
        wait = WebDriverWait(browser, 60)
        wait.until(expected_conditions.presence_of_element_located((By.XPATH, "//a/span[text()='smoke']")))
        expand = browser.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']")
        expand.click()  # the parent's children are folded under it
        wait.until(lambda b: len(b.find_elements(By.XPATH, "//a/span[starts-with(text(), 'trial_')]")) == 8)
        screenshot = tmp_path / "mlflow_experiment.png"
        browser.save_screenshot(str(screenshot))
    finally:
        browser.quit()
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
