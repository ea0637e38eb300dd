import numpy as np
import torch
from PIL import Image

from hetmm.config import FeatureConfig
from hetmm.core.features import FeatureExtractor, content_box, resize_image, to_tensor


def _image(w=120, h=80, value=(200, 100, 50)):
    return Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8))


def test_features_are_unit_length_per_pixel_and_in_storage_dtype():
    cfg = FeatureConfig(backbone="random_resnet18", image_size=(64, 64), layers=(1, 3), dtype="float16")
    feats = FeatureExtractor(cfg)([_image(), _image(value=(10, 20, 30))])
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 256, 4, 4)]
    assert all(f.dtype == torch.float16 for f in feats)
    norms = feats[0].float().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)


def test_official_normalisation_differs_in_green_only():
    img = [_image()]
    standard = to_tensor(img, FeatureConfig(image_size=(32, 32)))
    official = to_tensor(img, FeatureConfig(image_size=(32, 32), normalisation="official"))
    assert torch.equal(standard[:, [0, 2]], official[:, [0, 2]])
    assert torch.allclose(official[:, 1], standard[:, 1] * 0.224 / 0.256)


def test_pad_resize_keeps_aspect_and_reports_the_content_box():
    img = _image(w=120, h=60)
    out = resize_image(img, (64, 64), "pad")
    top, left, h, w = content_box(img.size, (64, 64), "pad")
    assert (top, left, h, w) == (16, 0, 32, 64)
    arr = np.asarray(out)
    assert arr[:top].max() == 0 and arr[top + h:].max() == 0 and arr[top:top + h].min() > 0
    assert content_box(img.size, (64, 64), "squash") == (0, 0, 64, 64)


def test_feature_key_changes_with_feature_settings_only():
    from hetmm.pipeline.provenance import FeatureKey

    a = FeatureKey.of(FeatureConfig(backbone="random_resnet18", batch_size=2))
    b = FeatureKey.of(FeatureConfig(backbone="random_resnet18", batch_size=16))
    c = FeatureKey.of(FeatureConfig(backbone="random_resnet18", image_size=(128, 128)))
    assert a.digest == b.digest != c.digest
    assert c.differences(a.record()) == "feature settings changed (image_size)"
