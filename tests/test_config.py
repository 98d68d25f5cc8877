import dataclasses

import pytest

from model import PRESETS
from tuning.config import PARAMS, TrialConfig


def test_from_dict_fills_model_keys_from_the_preset():
    cfg = TrialConfig.from_dict({"preset": "all-cnn-c", "lr": 0.05})
    assert (cfg.batchnorm, cfg.input_dropout, cfg.stage_dropout, cfg.lr) == (False, 0.2, 0.5, 0.05)
    assert cfg.model_config() == PRESETS["all-cnn-c"]


def test_given_keys_override_the_preset():
    cfg = TrialConfig.from_dict({"preset": "all-cnn-c", "batchnorm": True, "width_mult": 0.5})
    model = cfg.model_config()
    assert model.batchnorm and model.width_mult == 0.5 and model.stage_widths == (96, 192)


def test_round_trips_through_a_plain_dict():
    cfg = TrialConfig.from_dict({"preset": "seed", "optimizer": "adamw", "image_size": 64, "epochs": 7})
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg


def test_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrialConfig().lr = 1.0


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="'learning_rate'"):
        TrialConfig.from_dict({"learning_rate": 0.1})


@pytest.mark.parametrize(
    "key, value",
    [("lr", 0), ("lr", -0.1), ("momentum", 1.0), ("batch_size", 0), ("epochs", 2.5), ("stage_dropout", 1.0),
     ("width_mult", 0), ("label_smoothing", -0.1), ("lr_schedule", "linear"), ("optimizer", "adam"),
     ("batchnorm", "yes"), ("lr", "0.1"), ("lr", float("nan")), ("preset", "resnet"), ("image_size", 4)],
)  # fmt: skip
def test_out_of_range_value_is_named(key, value):
    with pytest.raises(ValueError, match=key):
        TrialConfig.from_dict({key: value})


def test_numbers_are_coerced_to_the_fields_type():
    cfg = TrialConfig.from_dict({"lr": 1, "batch_size": 128.0})
    assert isinstance(cfg.lr, float) and isinstance(cfg.batch_size, int)


def test_every_field_has_a_param_with_help():
    assert set(PARAMS) == {f.name for f in dataclasses.fields(TrialConfig)}
    assert all(p.help for p in PARAMS.values())
