import pytest
import torch
import torchvision

from hetmm.core.backbones import REGISTRY, ResNetFeatures, build_backbone, hub_weights_path
from hetmm.errors import ConfigError, WeightsNotFoundError


def test_efficientnet_lite0_strides_and_channels():
    model = build_backbone("efficientnet_lite0")
    out = model(torch.zeros(1, 3, 128, 96))
    assert [tuple(t.shape[1:]) for t in out] == [(24, 32, 24), (40, 16, 12), (112, 8, 6)]
    assert model.channels == (24, 40, 112)
    assert not any(p.requires_grad for p in model.parameters())


def test_efficientnet_all_blocks_concatenate_last_block_last():
    last = build_backbone("efficientnet_lite0")
    every = build_backbone("efficientnet_lite0", blocks="all")
    x = torch.randn(1, 3, 64, 64)
    a, b = last(x), every(x)
    assert every.channels == (48, 80, 576)
    for t_last, t_all in zip(a, b):
        assert torch.equal(t_all[:, -t_last.shape[1]:], t_last)


def test_lite_weights_are_real_imagenet_weights():
    # Trained BN statistics differ from the defaults of a freshly built network.
    model = build_backbone("efficientnet_lite0")
    bn = model.stem[1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_preact_features_match_torchvision_forward():
    model = build_backbone("random_resnet18", preact=True)
    post = build_backbone("random_resnet18", preact=False)
    x = torch.randn(2, 3, 64, 64)
    pre_maps, post_maps = model(x), post(x)
    for pre, ref in zip(pre_maps, post_maps):
        assert torch.allclose(torch.relu(pre), ref, atol=1e-5)
        assert (pre < 0).any()  # really before the ReLU


def test_resnet_weights_from_explicit_file(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()
                if not k.startswith(("layer4.", "fc."))}, path)
    model = build_backbone("resnet18", weights=str(path), preact=False)
    assert isinstance(model, ResNetFeatures)
    x = torch.randn(1, 3, 64, 64)
    reference.eval()
    with torch.no_grad():
        expected = reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x)))))))
    assert torch.allclose(model(x)[2], expected, atol=5e-2, rtol=1e-2)  # fp16 storage


def test_missing_weights_say_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone("wide_resnet101_2")
    message = str(info.value)
    assert "wide_resnet101_2-32ee1156.pth" in message and str(tmp_path) in message
    assert hub_weights_path("wide_resnet50_2").name == "wide_resnet50_2-95faca4d.pth"


def test_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "not_resnet.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(WeightsNotFoundError, match="does not hold resnet18 weights"):
        build_backbone("resnet18", weights=str(path))


def test_registry_errors_name_the_key():
    with pytest.raises(ConfigError, match="features.backbone"):
        build_backbone("vgg16")
    with pytest.raises(ConfigError, match="features.blocks"):
        build_backbone("random_resnet18", blocks="all")
    assert {"efficientnet_lite0", "resnet18", "wide_resnet101_2", "random_resnet18"} <= set(REGISTRY)
