"""Synthetic defects on real images: exact masks, visible changes, sizes scaled to the image, determinism,
grayscale kept grayscale, clear errors."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import skimage.data
from PIL import Image
from scipy import ndimage

from hetmm.data import synthetic
from hetmm.data.synthetic import DefectFamily, SyntheticDefect, make_defect, synthesize

FAMILIES = list(DefectFamily)
SEEDS = range(4)


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, -1)


def _resized(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


IMAGES = {
    "gravel": _rgb(skimage.data.gravel()[100:196, 200:328]),  # busy texture, 96x128
    "camera": _rgb(skimage.data.camera()[::4, ::4]),  # flat sky next to a textured coat, 128x128
    "astronaut": skimage.data.astronaut()[40:168, 180:308],  # colour, 128x128
}
FLAT = {
    "grey": np.full((80, 100, 3), 128, np.uint8),
    "white": np.full((64, 64, 3), 255, np.uint8),
    "ramp": _rgb(np.tile(np.linspace(20, 60, 120).astype(np.uint8), (90, 1))),  # dark, smooth, no texture at all
}


def _changed(defect: SyntheticDefect, image: np.ndarray, level: int = 3) -> np.ndarray:
    return np.abs(defect.image.astype(np.int16) - image).max(-1) >= level


def _assert_exact_and_visible(defect: SyntheticDefect, image: np.ndarray) -> None:
    assert defect.image.shape == image.shape and defect.image.dtype == np.uint8
    assert defect.mask.shape == image.shape[:2] and defect.mask.dtype == bool and defect.mask.any()
    assert np.array_equal(defect.image[~defect.mask], image[~defect.mask]), "pixels outside the mask changed"
    share = _changed(defect, image)[defect.mask].mean()
    assert share >= 0.5, f"{defect.family}: only {share:.0%} of the mask changed visibly"


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_is_exact_and_its_pixels_really_changed(family, name):
    image = IMAGES[name]
    for seed in SEEDS:
        defect = make_defect(image, family, np.random.default_rng(seed))
        assert defect.family is family
        _assert_exact_and_visible(defect, image)


@pytest.mark.parametrize("name", FLAT)
@pytest.mark.parametrize("family", FAMILIES)
def test_flat_surfaces_still_get_a_visible_defect(family, name):
    """A blur or a warp cannot show on a flat surface: DISTORT falls back to shading there, still inside its mask."""
    image = FLAT[name]
    for seed in SEEDS:
        _assert_exact_and_visible(make_defect(image, family, np.random.default_rng(seed)), image)


@pytest.mark.parametrize("shape", [(64, 96), (256, 256), (1024, 1024)])
def test_defect_size_scales_with_the_image_and_stays_inside_it(shape):
    image = _rgb(_resized(skimage.data.gravel(), shape))  # the 1024 one: grayscale as RGB, as lines deliver it
    frame = np.ones(shape, bool)
    frame[1:-1, 1:-1] = False
    for family in FAMILIES:
        for seed in range(3):
            defect = make_defect(image, family, np.random.default_rng(seed))
            _assert_exact_and_visible(defect, image)
            area = defect.mask.mean()
            assert 0.0005 <= area <= 0.12, f"{family} at {shape}: mask covers {area:.3%}"
            assert not defect.mask[frame].any(), f"{family} at {shape}: the defect touches the image border"
            if family is DefectFamily.SCRATCH:
                half_width = ndimage.distance_transform_edt(defect.mask).max()
                assert area <= 0.03 and half_width <= 0.012 * min(shape) / 2 + 1.5, "a scratch is a thin stroke"


def test_same_seed_same_defect_other_seed_other_defect():
    image = IMAGES["astronaut"]
    for family in FAMILIES:
        a, b = (make_defect(image, family, np.random.default_rng(3)) for _ in range(2))
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        c = make_defect(image, family, np.random.default_rng(4))
        assert not np.array_equal(a.mask, c.mask)
    normals = list(IMAGES.values())
    first, again, other = synthesize(normals, 1), synthesize(normals, 1), synthesize(normals, 2)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(first, again))
    assert all(not np.array_equal(x.mask, y.mask) for x, y in zip(first, other))


def test_synthesize_order_seeding_and_stability():
    normals = list(IMAGES.values())
    out = synthesize(normals, seed=7, per_image=2)
    assert len(out) == len(normals) * len(FAMILIES) * 2
    assert [d.family for d in out[:10]] == [f for f in FAMILIES for _ in range(2)]  # order: normal, family, repeat
    for i, image in enumerate(normals):
        for k, family in enumerate(FAMILIES):
            for r in range(2):
                got = out[(i * len(FAMILIES) + k) * 2 + r]
                assert got.image.shape == image.shape
                if family is not DefectFamily.CUTPASTE:  # cut-paste also depends on its donor
                    want = make_defect(image, family, np.random.default_rng([7, i, k, r]))
                    assert np.array_equal(got.image, want.image) and np.array_equal(got.mask, want.mask)
    # a family subset, or one more normal, leaves every other defect as it was
    only = synthesize(normals, seed=7, families=["scratch", DefectFamily.TEXTURE], per_image=2)
    by_key = {(i, d.family, r): d for i in range(3) for d, r in zip(out[i * 10:(i + 1) * 10], [0, 1] * 5)}
    assert [d.family for d in only[:4]] == ["scratch", "scratch", "texture", "texture"]
    for n, d in enumerate(only):
        assert np.array_equal(d.image, by_key[(n // 4, d.family, n % 2)].image)
    fewer = synthesize(normals[:2], seed=7, per_image=2)
    for n, d in enumerate(fewer):
        if d.family is not DefectFamily.CUTPASTE:
            assert np.array_equal(d.image, out[n].image) and np.array_equal(d.mask, out[n].mask)
    assert synthesize(normals, seed=7, per_image=0) == []


def test_cutpaste_takes_its_patch_from_the_donor_or_from_the_image_itself():
    image, donor = IMAGES["gravel"], np.full((60, 200, 3), 90, np.uint8)  # a donor of another size, one flat grey
    for seed in SEEDS:
        pasted = make_defect(image, "cutpaste", np.random.default_rng(seed), donors=[donor])
        assert pasted.image[pasted.mask].std() < 3 < image[pasted.mask].std()
    (alone,) = synthesize([image], seed=0, families=["cutpaste"])  # one normal: cut from itself, elsewhere
    _assert_exact_and_visible(alone, image)


def test_inputs_are_not_modified():
    image, donor = IMAGES["astronaut"].copy(), IMAGES["gravel"].copy()
    for family in FAMILIES:
        make_defect(image, family, np.random.default_rng(0), donors=[donor])
    synthesize([image, donor], seed=0)
    assert np.array_equal(image, IMAGES["astronaut"]) and np.array_equal(donor, IMAGES["gravel"])


def test_grayscale_in_grayscale_out():
    """A grayscale line must not get colour defects it could never have: not from colour texture photos, not from
    a colour donor, not from a tint."""
    image, colour_donor = IMAGES["camera"], IMAGES["astronaut"]
    for family in FAMILIES:
        for seed in range(6):
            out = make_defect(image, family, np.random.default_rng(seed), donors=[colour_donor]).image
            assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2]), family


def test_bad_family_and_bad_images_raise_value_errors():
    image = IMAGES["gravel"]
    with pytest.raises(ValueError, match="crack.*texture, cutpaste, scratch, intensity, distort"):
        make_defect(image, "crack", np.random.default_rng(0))
    with pytest.raises(ValueError, match="allowed"):
        synthesize([image], seed=0, families=["Scratch"])
    bad = [image[..., 0], image.astype(np.float32), np.dstack([image, image[..., :1]]), image[:8, :8], image.tolist()]
    for thing in bad:
        with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8|at least"):
            make_defect(thing, "scratch", np.random.default_rng(0))
    with pytest.raises(ValueError, match="donor"):
        make_defect(image, "cutpaste", np.random.default_rng(0), donors=[image[..., 0]])


def test_perlin_noise_is_smooth_normalised_and_seeded():
    a = synthetic._perlin((120, 200), np.random.default_rng(0))
    assert a.shape == (120, 200) and a.dtype == np.float32
    assert abs(a.mean()) < 1e-4 and abs(a.std() - 1) < 1e-4
    assert np.abs(np.diff(a, axis=1)).mean() < 0.2  # white noise of unit std would give ~1.1
    assert np.array_equal(a, synthetic._perlin((120, 200), np.random.default_rng(0)))
    assert not np.allclose(a, synthetic._perlin((120, 200), np.random.default_rng(1)))
    blob = synthetic._blob((60, 80), 0.45, np.random.default_rng(0))
    assert abs(blob.sum() - 0.45 * 58 * 78) <= 1  # the quantile cut sets the area exactly
    labels, n = ndimage.label(blob)
    assert np.bincount(labels.ravel())[1:].max() >= 0.7 * blob.sum()  # one main blob, perhaps small satellites


def test_texture_photos_ship_with_scikit_image(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    synthetic._photo.cache_clear()
    for name in synthetic.TEXTURES:
        photo = synthetic._photo(name)
        assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8 and min(photo.shape[:2]) >= 256


def _object_on_backdrop() -> tuple[np.ndarray, np.ndarray]:
    """A textured disc (the part, about 20 % of the image) on a plain yellow backdrop with a little noise."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal((200, 180, 40), 2, (160, 160, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:160, :160]
    disc = (yy - 80) ** 2 + (xx - 90) ** 2 < 40 ** 2
    image[disc] = _rgb(skimage.data.gravel()[:160, :160])[disc] // 2 + 40
    return image, disc


def test_defects_on_an_object_line_lie_on_the_part_and_scale_with_it():
    image, disc = _object_on_backdrop()
    part = synthetic._part(image)
    assert part is not None and abs(part.share - disc.mean()) < 0.02
    assert all(synthetic._part(im) is None for im in [*IMAGES.values(), *FLAT.values()])  # textures, plain images
    for family in FAMILIES:
        for seed in SEEDS:
            defect = make_defect(image, family, np.random.default_rng(seed))
            _assert_exact_and_visible(defect, image)
            on_part = (defect.mask & disc).sum() / defect.mask.sum()
            assert on_part >= 0.5, f"{family} seed {seed}: {on_part:.0%} of the defect on the part"
            assert defect.mask.sum() <= 0.2 * disc.sum(), f"{family} seed {seed}: larger than the part allows"
