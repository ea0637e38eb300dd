import math

import pytest
import torch
import torch.nn.functional as F

from hetmm.core.matching import match_layer, nearest_patch
from hetmm.core.scoring import fuse_layers, fuse_matches, gaussian_blur, image_scores, match_layers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=1)


def _const(value, b, h, w, device="cpu"):
    return torch.full((b, h, w), float(value), device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_fuse_mixes_with_alpha_and_sums_weighted_layers(device):
    forward = [_const(0.2, 2, 8, 8, device), _const(0.6, 2, 4, 4, device)]
    backward = [_const(1.0, 2, 8, 8, device), _const(0.1, 2, 4, 4, device)]
    out = fuse_layers(forward, backward, [0.25, 0.5], [1.0, 0.5], (16, 12))
    want = 1.0 * (0.25 * 0.2 + 0.75 * 1.0) + 0.5 * (0.5 * 0.6 + 0.5 * 0.1)  # a sum, not a mean
    assert out.shape == (2, 16, 12) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, want))


def test_fuse_upsamples_bilinear_with_aligned_corners():
    fmap = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    out = fuse_layers([fmap], [None], [1.0], [1.0], 3)
    want = torch.tensor([[[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]])
    assert torch.allclose(out, want)


def test_fuse_accepts_missing_directions_only_with_matching_alpha():
    m = _const(0.5, 1, 2, 2)
    assert torch.allclose(fuse_layers([None], [m], [0.0], [2.0], 4), _const(1.0, 1, 4, 4))
    assert torch.allclose(fuse_layers([m], [None], [1.0], [1.0], 4), _const(0.5, 1, 4, 4))
    with pytest.raises(ValueError, match="alpha must be 0"):
        fuse_layers([None], [m], [0.5], [1.0], 4)
    with pytest.raises(ValueError, match="alpha must be 1"):
        fuse_layers([m], [None], [0.3], [1.0], 4)
    with pytest.raises(ValueError, match="both"):
        fuse_layers([None], [None], [1.0], [1.0], 4)
    with pytest.raises(ValueError, match="per layer"):
        fuse_layers([m, m], [m], [1.0], [1.0], 4)


def _gaussian_2d(sigma, k):
    kernel = torch.empty(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            kernel[i, j] = math.exp(-((i - k // 2) ** 2 + (j - k // 2) ** 2) / (2 * sigma**2))
    return kernel / kernel.sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("sigma", "k"), [(1.0, None), (2.5, 7), (4.0, 33), (0.6, 1)])
def test_separable_blur_equals_the_2d_zero_padded_kernel(device, sigma, k):
    maps = torch.rand(2, 20, 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    size = 2 * math.ceil(4 * sigma) + 1 if k is None else k
    want = F.conv2d(maps.unsqueeze(1), _gaussian_2d(sigma, size)[None, None], padding=size // 2)
    got = gaussian_blur(maps.to(device), sigma, k)
    assert torch.allclose(got.cpu(), want.squeeze(1), atol=1e-12)


def test_blur_zero_padding_lowers_the_border_and_sigma_zero_is_identity():
    ones = torch.ones(1, 15, 15, dtype=torch.float64)
    out = gaussian_blur(ones, 1.5, 9)
    g = torch.exp(-((torch.arange(9, dtype=torch.float64) - 4) ** 2) / (2 * 1.5**2))
    inside = (g[4:].sum() / g.sum()) ** 2  # the corner sees one quadrant of the kernel
    assert math.isclose(out[0, 0, 0].item(), inside.item(), rel_tol=1e-12)
    assert math.isclose(out[0, 7, 7].item(), 1.0, rel_tol=1e-12)
    assert gaussian_blur(ones, 0.0) is ones
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(ones, 1.0, 4)


def test_image_scores_max_and_block_mean_drop_the_remainder():
    maps = torch.zeros(2, 5, 5)
    maps[0, 0, 1], maps[0, 3, 3], maps[0, 2, 0] = 4.0, 2.0, 1.0
    maps[0, 4, 4] = 100.0  # bottom/right remainder of 5 mod 2: dropped by block_mean
    maps[1] = 3.0
    assert torch.equal(image_scores(maps, "max"), torch.tensor([100.0, 3.0]))
    # 2x2 cells over rows/cols 0..3: maxima 4, 0, 1, 2 -> mean 1.75
    assert torch.allclose(image_scores(maps, "block_mean", 2), torch.tensor([1.75, 3.0]))
    with pytest.raises(ValueError, match="block"):
        image_scores(maps, "block_mean")
    with pytest.raises(ValueError, match="unknown"):
        image_scores(maps, "mean")


# Two layers at strides like a real backbone: 12x10 and 6x5 grids.
def _layers(b=2, n=3):
    feats = [_unit(b, 6, 12, 10, seed=1), _unit(b, 10, 6, 5, seed=2)]
    temps = [_unit(n, 6, 12, 10, seed=3), _unit(n, 10, 6, 5, seed=4)]
    return feats, temps


SETTINGS = dict(forward_windows=[5, 3], backward_windows=[3, 5], alphas=[0.3, 0.6], weights=[1.0, 0.5])


def _score(feats, temps, mode="mutual", **changes):
    s = {**SETTINGS, **changes}
    matches = match_layers(feats, temps, s["forward_windows"], s["backward_windows"], s["alphas"], s["weights"], mode)
    return fuse_matches(matches, (24, 20))


def test_mutual_mode_is_match_then_fuse():
    feats, temps = _layers()
    pairs = [match_layer(q, t, kf, kb) for q, t, kf, kb in
             zip(feats, temps, SETTINGS["forward_windows"], SETTINGS["backward_windows"])]
    want = fuse_layers([p[0] for p in pairs], [p[1] for p in pairs], SETTINGS["alphas"],
                       SETTINGS["weights"], (24, 20))
    assert torch.allclose(_score(feats, temps), want, atol=1e-6)


def test_forward_and_backward_modes_ignore_the_other_window():
    feats, temps = _layers()
    forward = _score(feats, temps, "forward")
    assert torch.equal(forward, _score(feats, temps, "forward", backward_windows=[7, 1]))
    want = fuse_layers([match_layer(q, t, k, 0)[0] for q, t, k in zip(feats, temps, [5, 3])],
                       [None, None], [1.0, 1.0], SETTINGS["weights"], (24, 20))
    assert torch.allclose(forward, want, atol=1e-6)
    backward = _score(feats, temps, "backward")
    assert torch.equal(backward, _score(feats, temps, "backward", forward_windows=[1, 7]))
    want = fuse_layers([None, None], [match_layer(q, t, 0, k)[1] for q, t, k in zip(feats, temps, [3, 5])],
                       [0.0, 0.0], SETTINGS["weights"], (24, 20))
    assert torch.allclose(backward, want, atol=1e-6)


def test_pixel_mode_is_position_aligned_matching():
    feats, temps = _layers()
    pixel = _score(feats, temps, "pixel")
    assert torch.allclose(pixel, _score(feats, temps, forward_windows=[1, 1], backward_windows=[1, 1]))
    # With window 1 both directions compare Q(p) with T_n(p): the alphas cannot matter.
    assert torch.allclose(pixel, _score(feats, temps, "pixel", alphas=[0.9, 0.1]), atol=1e-6)
    assert (pixel >= _score(feats, temps) - 1e-6).all()  # larger windows can only find closer matches


def test_patch_mode_uses_the_nearest_template_vector_anywhere():
    feats, temps = _layers()
    want = fuse_layers([nearest_patch(q, t) for q, t in zip(feats, temps)], [None, None],
                       [1.0, 1.0], SETTINGS["weights"], (24, 20))
    assert torch.allclose(_score(feats, temps, "patch"), want, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["mutual", "forward", "backward", "pixel", "patch"])
def test_a_query_equal_to_a_template_scores_zero_everywhere(device, mode):
    _, temps = _layers(n=4)
    temps = [t.to(device) for t in temps]
    feats = [t[[1, 3]] for t in temps]
    maps = _score(feats, temps, mode)
    assert maps.shape == (2, 24, 20) and maps.abs().max() < 1e-5


def test_zero_weight_layers_are_skipped_without_changing_the_result():
    feats, temps = _layers()
    got = _score(feats, temps, weights=[1.0, 0.0])
    pairs = [match_layer(q, t, kf, kb) for q, t, kf, kb in zip(feats, temps, [5, 3], [3, 5])]
    want = fuse_layers([p[0] for p in pairs], [p[1] for p in pairs], SETTINGS["alphas"], [1.0, 0.0], (24, 20))
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(_score(feats, temps, weights=[0.0, 0.0]), torch.zeros(2, 24, 20))


def test_matching_rejects_unknown_modes_and_ragged_settings():
    feats, temps = _layers()
    with pytest.raises(ValueError, match="mode"):
        _score(feats, temps, "nearest")
    with pytest.raises(ValueError, match="each of the 2 layers"):
        _score(feats, temps, alphas=[0.5])


@pytest.mark.parametrize("mode", ["mutual", "forward", "backward", "pixel", "patch"])
def test_matches_against_two_sheet_sets_merge_into_the_matches_against_both(mode):
    feats, temps = _layers(n=5)
    s = {**SETTINGS, "weights": [1.0, 0.0]} if mode == "pixel" else SETTINGS  # a skipped layer stays skipped
    args = (s["forward_windows"], s["backward_windows"], s["alphas"], s["weights"], mode)
    whole = match_layers(feats, temps, *args)
    merged = match_layers(feats, [t[:2] for t in temps], *args).merged(
        match_layers(feats, [t[2:] for t in temps], *args))
    assert merged.plan == whole.plan and len(whole.plan) == (1 if mode == "pixel" else 2)
    for got, want in zip([*merged.forward, *merged.backward], [*whole.forward, *whole.backward]):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(fuse_matches(merged, (24, 20)), _score(feats, temps, mode, weights=s["weights"]), atol=1e-6)
    # the first sheet set alone is a different (higher-distance) answer: the merge is not a no-op
    assert not torch.allclose(fuse_matches(match_layers(feats, [t[:2] for t in temps], *args), (24, 20)),
                              fuse_matches(whole, (24, 20)), atol=1e-3)
    with pytest.raises(ValueError, match="different plans"):
        whole.merged(match_layers(feats, temps, [3, 3], [3, 3], s["alphas"], s["weights"],
                                  "mutual" if mode != "mutual" else "pixel"))
