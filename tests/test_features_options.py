"""Feature-side options added for MTD (issue 5): per-image normalisation, local pooling, flip averaging."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from hetmm.config import FeatureConfig, parse_params
from hetmm.core.features import FeatureExtractor, content_box, local_average, standardise_per_image, to_tensor
from hetmm.errors import ConfigError
from hetmm.io import sha256_json


def _texture(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(40, 200, size=(h, w, 3), dtype=np.uint8))


def test_defaults_and_fingerprint():
    cfg = FeatureConfig()
    assert (cfg.normalisation, cfg.pool, cfg.flip_average) == ("imagenet", 1, False)
    assert FeatureConfig(pool=3).fingerprint()["pool"] == 3
    assert FeatureConfig(flip_average=True).fingerprint()["flip_average"] is True
    digests = {sha256_json(c.fingerprint()) for c in (cfg, FeatureConfig(pool=3), FeatureConfig(flip_average=True),
                                                      FeatureConfig(normalisation="image"))}
    assert len(digests) == 4


def test_image_normalisation_standardises_content_and_removes_gain_and_offset():
    img = _texture()
    x = to_tensor([img], FeatureConfig(image_size=(48, 64), normalisation="image"))
    assert torch.allclose(x.mean(dim=(2, 3)), torch.zeros(1, 3), atol=1e-5)
    assert torch.allclose(x.std(dim=(2, 3)), torch.ones(1, 3), atol=1e-2)
    # an exposure change (gain and offset, no clipping) gives the same network input
    arr = np.asarray(img).astype(np.float32)
    brighter = Image.fromarray(np.clip(arr * 1.2 + 10, 0, 255).round().astype(np.uint8))
    y = to_tensor([brighter], FeatureConfig(image_size=(48, 64), normalisation="image"))
    assert (x - y).abs().max() < 0.05


def test_image_normalisation_with_pad_uses_the_content_box_and_zeroes_the_canvas():
    img = _texture(w=64, h=32)
    cfg = FeatureConfig(image_size=(64, 64), resize="pad", normalisation="image")
    x = to_tensor([img], cfg)
    top, left, h, w = content_box(img.size, cfg.image_size, "pad")
    inside = x[0, :, top:top + h, left:left + w]
    assert torch.allclose(inside.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5)
    assert x[0, :, :top].abs().max() == 0 and x[0, :, top + h:].abs().max() == 0
    flat = standardise_per_image(torch.full((1, 3, 8, 8), 0.5), [(0, 0, 8, 8)])
    assert torch.isfinite(flat).all() and flat.abs().max() == 0


def test_pool_is_a_truncated_local_mean_of_the_raw_features():
    raw = torch.randn(2, 5, 6, 7)
    pooled = local_average(raw, 3)
    assert pooled.shape == raw.shape
    assert torch.allclose(pooled[:, :, 2, 3], raw[:, :, 1:4, 2:5].mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(pooled[:, :, 0, 0], raw[:, :, :2, :2].mean(dim=(2, 3)), atol=1e-6)  # border: no zeros
    assert torch.equal(local_average(raw, 1), raw)

    cfg = FeatureConfig(backbone="random_resnet18", image_size=(64, 64), layers=(1, 2), pool=3)
    ext = FeatureExtractor(cfg)
    img = [_texture(64, 64)]
    got = ext(img)
    with torch.no_grad():
        maps = ext.backbone(to_tensor(img, cfg))
    for layer, feats in zip(cfg.layers, got):
        want = F.normalize(local_average(maps[layer - 1], 3), dim=1)
        assert torch.allclose(feats, want, atol=1e-5)


def test_flip_average_makes_features_mirror_equivariant():
    cfg = FeatureConfig(backbone="random_resnet18", image_size=(64, 64), layers=(1, 3), flip_average=True)
    ext = FeatureExtractor(cfg)
    img = _texture(64, 64, seed=1)
    plain, mirrored = ext([img]), ext([ImageOps.mirror(img)])
    for a, b in zip(plain, mirrored):
        assert torch.allclose(a.flip(-1), b, atol=1e-5)
    off = FeatureExtractor(dataclasses.replace(cfg, flip_average=False))
    a, b = off([img])[0], off([ImageOps.mirror(img)])[0]
    assert not torch.allclose(a.flip(-1), b, atol=1e-3)  # the plain network is not equivariant


def _raw_params(**features):
    return {"product_lines": {"mtd": {"features": {"layers": [2, 3], **features},
                                      "matching": {"forward_windows": [5, 3], "backward_windows": [3, 3],
                                                   "alphas": [0.5, 0.5], "weights": [1.0, 1.0]}}}}


def test_params_accept_the_options_and_reject_bad_pools():
    line = parse_params(_raw_params(normalisation="image", pool=3, flip_average=True)).line("mtd")
    assert (line.features.normalisation, line.features.pool, line.features.flip_average) == ("image", 3, True)
    for bad in (0, 2):
        with pytest.raises(ConfigError, match="features.pool"):
            parse_params(_raw_params(pool=bad)).line("mtd")
    with pytest.raises(ConfigError, match="normalisation"):
        parse_params(_raw_params(normalisation="per_image")).line("mtd")
