"""Model shapes and sizes."""
import pytest
import torch

from metabook.models import DeepCNN, build_model, count_params
from metabook.config import ConfigError


@pytest.mark.parametrize("name", ["small_cnn", "plain_cnn", "res_cnn", "resnet18", "mlp"])
def test_every_model_maps_images_to_logits(name):
    model = build_model(name, num_classes=7, width=8, depth=5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_small_cnn_has_between_0_1_and_0_3_million_parameters():
    assert 100_000 <= count_params(build_model("small_cnn", 10, width=32)) <= 300_000


def test_resnet18_cifar_variant_has_11_2_million_parameters():
    assert abs(count_params(build_model("resnet18", 10, width=64)) - 11_173_962) < 1000


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
    with pytest.raises(ConfigError, match="choose one of: small_cnn, plain_cnn, res_cnn, resnet18, mlp"):
        build_model("vgg", 10)
