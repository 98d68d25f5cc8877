"""Real CIFAR-10 (the JPEG archive): the accuracy the core promises on a 2-core CPU."""

import pytest
import torch

from tuning.config import TrialConfig
from tuning.data import load_data, make_trial_data
from tuning.training import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar10(cifar_jpeg_dir):
    data = load_data("folder", cifar_jpeg_dir)
    assert (len(data.train), len(data.test)) == (50_000, 10_000)
    return data


def test_seed_net_reaches_65_percent_in_3_epochs(cifar10):
    data = make_trial_data(cifar10, val_size=5000, seed=0)
    assert (len(data.train), len(data.val)) == (45_000, 5_000)
    cfg = TrialConfig.from_dict({"preset": "seed", "epochs": 3})
    history = [metrics for metrics, _ in fit(cfg, data, torch.device("cpu"))]
    print("seed net, 3 epochs:", [f"{m['val_acc']:.2%} @ {m['images_per_s']:.0f} img/s" for m in history])
    assert history[-1]["val_acc"] >= 0.65
