"""`python -m tuning.models`: list, evaluate, predict and promote against a real MLflow store."""

import pytest
import torch

from model import AllConvNet, preset
from tuning.models import main
from tuning.tracking import SearchTracker, register_champion


def test_a_model_uri_that_does_not_exist_is_named(tmp_path, image_folder, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["--tracking-uri", uri, "evaluate", "models:/nope/1", "--dataset", "folder", "--data", str(image_folder)]) == 2
    err = capsys.readouterr().err
    assert "models:/nope/1" in err and "Traceback" not in err


@pytest.mark.slow
def test_list_evaluate_predict_and_promote(tmp_path, image_folder, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SearchTracker(uri, "allconv", "s1", 1, str(tmp_path))
    torch.manual_seed(0)
    model = AllConvNet(preset("seed", width_mult=0.25, num_classes=3)).eval()
    example = torch.rand(2, 3, 16, 16).numpy()
    for accuracy in (0.5, 0.4):
        register_champion(uri, tracker.parent_run_id, model, example, accuracy, "allconv-cifar10", ["cat", "dog", "frog"])
    flags = ["--tracking-uri", uri]

    assert main([*flags, "list"]) == 0
    listing = capsys.readouterr().out
    assert "models:/allconv-cifar10/1 @champion" in listing and "models:/allconv-cifar10/2" in listing

    out = tmp_path / "confusion.png"
    assert main([*flags, "evaluate", "models:/allconv-cifar10@champion", "--dataset", "folder",
                 "--data", str(image_folder), "--out", str(out)]) == 0  # fmt: skip
    report = capsys.readouterr().out
    assert "test accuracy" in report and "frog" in report and out.stat().st_size > 1000

    image = image_folder / "test" / "dog" / "0000.png"
    assert main([*flags, "predict", "models:/allconv-cifar10/2", str(image)]) == 0
    prediction = capsys.readouterr().out
    assert str(image) in prediction and any(name in prediction for name in ("cat", "dog", "frog")) and "%" in prediction

    assert main([*flags, "promote", "2"]) == 0
    assert main([*flags, "list"]) == 0
    assert "models:/allconv-cifar10/2 @champion" in capsys.readouterr().out
    assert main([*flags, "promote", "9"]) == 2
