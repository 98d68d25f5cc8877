import pytest
import torch
from torch import nn

from model import PRESETS, AllConvNet, ModelConfig, parameter_count, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("size", [32, 64])
def test_output_is_one_logit_per_class(name, size):
    model = AllConvNet(preset(name, num_classes=7))
    assert model(torch.rand(3, 3, size, size)).shape == (3, 7)


def test_all_cnn_c_has_the_papers_parameter_count():
    count = parameter_count(AllConvNet(preset("all-cnn-c")))
    assert abs(count - 1_369_738) / 1_369_738 < 0.01


def test_all_cnn_c_has_no_fully_connected_layer():
    model = AllConvNet(preset("all-cnn-c"))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.head[-2], nn.AdaptiveAvgPool2d)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_batchnorm_off_leaves_no_batchnorm_and_turns_biases_on(name):
    off = AllConvNet(preset(name, batchnorm=False))
    on = AllConvNet(preset(name, batchnorm=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in off.modules())
    assert all(m.bias is not None for m in off.modules() if isinstance(m, nn.Conv2d))
    assert any(isinstance(m, nn.BatchNorm2d) for m in on.modules())


def stage_sizes(model: AllConvNet, size: int) -> list[tuple[int, ...]]:
    shapes = []
    hooks = [stage.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape))) for stage in model.stages]
    model(torch.rand(2, 3, size, size))
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("size", [32, 64])
def test_stride_and_pool_give_the_same_sizes_at_every_stage(name, size):
    stride = stage_sizes(AllConvNet(preset(name, downsample="stride")), size)
    pool = stage_sizes(AllConvNet(preset(name, downsample="pool")), size)
    assert stride == pool
    assert [s[-1] for s in stride] == [size // 2 ** (i + 1) for i in range(len(stride))]
    assert any(isinstance(m, nn.MaxPool2d) for m in AllConvNet(preset(name, downsample="pool")).modules())


def test_width_multiplier_scales_hidden_widths_only():
    model = AllConvNet(preset("seed", width_mult=2.0))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 32 and convs[-1].out_channels == 10


def test_dropout_follows_the_input_and_every_downsampling():
    model = AllConvNet(preset("all-cnn-c"))
    assert model.input_dropout.p == 0.2
    assert [stage[-1].p for stage in model.stages] == [0.5, 0.5]


def test_normalisation_travels_with_the_model():
    model = AllConvNet(preset("seed"), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    restored = AllConvNet(preset("seed"))
    restored.load_state_dict(model.state_dict())
    assert torch.allclose(restored.mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))


@pytest.mark.parametrize(
    "overrides, key",
    [({"width_mult": 0}, "width_mult"), ({"stage_dropout": 1.0}, "stage_dropout"),
     ({"downsample": "avg"}, "downsample"), ({"stage_widths": (16, 0)}, "stage_widths")],
)  # fmt: skip
def test_impossible_model_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig(**{"stage_widths": (16,), "convs_per_stage": 1, **overrides})
