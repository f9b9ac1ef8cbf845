"""Model shapes and sizes."""
import pytest
import torch

from metabook.models import DeepCNN, build_model, count_params
from metabook.config import ConfigError


@pytest.mark.parametrize("name", ["small_cnn", "plain_cnn", "res_cnn", "resnet18", "mlp", "cuda_convnet"])
def test_every_model_maps_images_to_logits(name):
    model = build_model(name, num_classes=7, width=8, depth=5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_small_cnn_has_between_0_1_and_0_3_million_parameters():
    assert 100_000 <= count_params(build_model("small_cnn", 10, width=32)) <= 300_000


def test_resnet18_cifar_variant_has_11_2_million_parameters():
    assert abs(count_params(build_model("resnet18", 10, width=64)) - 11_173_962) < 1000


def test_cuda_convnet_has_the_layers_18pct_size_and_shapes():
    """conv5x5 32/32/64 with three 3/2 pools (32 -> 16 -> 8 -> 4 pixels), then linear 1024 -> 10:
    2,432 + 25,632 + 51,264 + 10,250 = 89,578 parameters."""
    model = build_model("cuda_convnet", 10, width=32)
    assert count_params(model) == 89_578
    assert [tuple(c.weight.shape) for c in (model.conv1, model.conv2, model.conv3)] == \
        [(32, 3, 5, 5), (32, 32, 5, 5), (64, 32, 5, 5)]
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_deep_cnn_exposes_one_feature_map_per_block():
    model = DeepCNN(depth=7, width=4)
    feats = model.features(torch.randn(2, 3, 32, 32))
    assert len(feats) == 7
    assert [f.shape[-1] for f in feats] == [32, 32, 32, 16, 16, 8, 8]
    assert [f.shape[1] for f in feats] == [4, 4, 4, 8, 8, 16, 16]


def test_skips_change_the_function_but_not_the_parameters():
    torch.manual_seed(0)
    plain = DeepCNN(depth=9, width=4, skips=False)
    torch.manual_seed(0)
    res = DeepCNN(depth=9, width=4, skips=True)
    assert count_params(plain) == count_params(res)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain(x), res(x))


def test_unknown_model_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of: small_cnn, plain_cnn, res_cnn, resnet18, mlp, cuda_convnet"):
        build_model("vgg", 10)


def test_batchnorm_free_deep_cnn_keeps_the_signal_scale_through_depth():
    """He initialisation: the last block's output has about the first block's scale (PyTorch's
    default init would shrink its variance about 6x per layer: 6^-15 over 16 layers)."""
    torch.manual_seed(0)
    model = DeepCNN(depth=16, width=8, batchnorm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    feats = model.features(torch.randn(16, 3, 32, 32))
    first, last = feats[0].pow(2).mean().sqrt().item(), feats[-1].pow(2).mean().sqrt().item()
    assert 0.1 < last / first < 10, (first, last)


def test_res_cnn_shortcut_wraps_one_layer():
    """The second layer of a pair outputs h_2(z_1) + z_1 (the docstring's z_2), not a pair's sum."""
    torch.manual_seed(0)
    res = DeepCNN(depth=6, width=4, skips=True)
    x = torch.randn(2, 3, 32, 32)
    feats = res.features(x)
    z1 = feats[0]
    assert torch.allclose(feats[1], res.blocks[1](z1) + z1)
    assert torch.allclose(feats[0], res.blocks[0](x))                  # the first layer has none


@pytest.mark.parametrize("batchnorm", [True, False])
def test_res_cnn_adds_a_shortcut_exactly_where_shortcut_layers_says(batchnorm):
    torch.manual_seed(0)
    res = DeepCNN(depth=16, width=4, skips=True, batchnorm=batchnorm).eval()
    x = torch.randn(2, 3, 32, 32)
    feats, inp = res.features(x), x
    for i, (block, has) in enumerate(zip(res.blocks, res._shortcut_layers())):
        inp = torch.nn.functional.max_pool2d(inp, 2) if res.pool_before[i] else inp
        assert torch.allclose(feats[i], block(inp) + (inp if has else 0)), i
        inp = feats[i]
    assert sum(res._shortcut_layers()) == 7                      # stages of 6, 5, 5 layers: 3 + 2 + 2


def test_batchnorm_free_res_cnn_starts_with_a_bounded_signal():
    """The shortcut layers start scaled by 1/sqrt(7 shortcuts at depth 16, 15 at depth 32): the last
    block's scale stays within 10x of the first's (unscaled He init: about 100x at depth 32)."""
    for depth in (16, 32):
        torch.manual_seed(0)
        feats = DeepCNN(depth=depth, width=8, skips=True, batchnorm=False).features(torch.randn(16, 3, 32, 32))
        assert feats[-1].pow(2).mean().sqrt() / feats[0].pow(2).mean().sqrt() < 10, depth
