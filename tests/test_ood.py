from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bayessparse.data import Split, preprocess
from bayessparse.data.ood import (
    RANDOM_ROTATION,
    gaussian_noise,
    invert,
    natural_crops,
    ood_sets,
    rotate,
    shuffle_pixels,
    uniform_noise,
)

# bilinear sampling at a pixel centre computed in float32 lands ~1e-6 of a pixel off it,
# which moves a value by at most that times the 255 contrast: well under 1e-2.
ROTATION_ATOL = 1e-2
RANDOM_SETS = ("rotated_random", "shuffled", "uniform_noise", "gaussian_noise", "natural")


def digits(n: int = 16, seed: int = 0) -> torch.Tensor:
    """MNIST-like raw images: whole numbers in 0..255, mostly background 0."""
    generator = torch.Generator().manual_seed(seed)
    strokes = torch.rand(n, 1, 28, 28, generator=generator) < 0.2
    values = torch.randint(1, 256, (n, 1, 28, 28), generator=generator).float()
    return values * strokes


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rotation_by_multiples_of_90_degrees_matches_rot90(k):
    images = digits()
    expected = torch.rot90(images, k, dims=(-2, -1))  # counter-clockwise as displayed
    assert torch.allclose(rotate(images, 90.0 * k), expected, atol=ROTATION_ATOL, rtol=0)
    assert torch.allclose(rotate(images, -90.0 * k), torch.rot90(images, -k, (-2, -1)), atol=1e-2)


def test_random_rotation_draws_one_seeded_angle_per_image():
    images = digits(8)
    rotated = rotate(images, (45.0, 315.0), seed=7)
    angles = 45.0 + 270.0 * torch.rand(
        8, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    for i in (0, 5):  # the same as rotating that image alone by its angle
        alone = rotate(images[i : i + 1], float(angles[i]))
        assert torch.allclose(rotated[i : i + 1], alone, atol=1e-4)
    assert torch.equal(rotate(images, (45.0, 315.0), seed=7), rotated)
    assert not torch.equal(rotate(images, (45.0, 315.0), seed=8), rotated)


def test_rotation_fills_corners_with_background():
    images = torch.full((1, 1, 28, 28), 255.0)
    rotated = rotate(images, 45.0)
    assert rotated[0, 0, 0, 0] == 0.0 and rotated[0, 0, 14, 14] == pytest.approx(255.0)


def test_invert():
    images = digits()
    assert torch.equal(invert(images), 255.0 - images)
    assert torch.equal(invert(invert(images)), images)


def test_shuffle_pixels_permutes_each_image_its_own_way():
    # Every pixel holds its own index, so a shuffled image shows its permutation.
    images = torch.arange(784.0).reshape(1, 1, 28, 28).repeat(3, 1, 1, 1)
    shuffled = shuffle_pixels(images, seed=0).flatten(1)
    assert torch.equal(shuffled.sort(1).values, images.flatten(1))  # a permutation
    assert not torch.equal(shuffled[0], shuffled[1])  # per image, not one for all
    assert not torch.equal(shuffled[0], images.flatten(1)[0])
    assert torch.equal(shuffle_pixels(images, seed=0).flatten(1), shuffled)
    assert not torch.equal(shuffle_pixels(images, seed=1).flatten(1), shuffled)


@pytest.mark.parametrize("make", [uniform_noise, gaussian_noise])
def test_noise_matches_the_pixel_mean_and_std(make):
    images = digits(64)
    mean, std = float(images.double().mean()), float(images.double().std(correction=0))
    noise = make(images, seed=0)
    assert noise.shape == images.shape and noise.dtype == images.dtype
    noise = noise.double()
    # 64 * 784 = 50176 pixels: the sample mean's standard error is std / 224 (~0.4 here),
    # the sample std's relative one at most sqrt(2 / (4 * 50176)) = 0.3 %; 5 of those each.
    assert float(noise.mean()) == pytest.approx(mean, abs=5 * std / math.sqrt(noise.numel()))
    assert float(noise.std(correction=0)) == pytest.approx(std, rel=0.016)
    assert torch.equal(make(images, seed=0).double(), noise)
    assert not torch.equal(make(images, seed=1).double(), noise)


def test_uniform_noise_spans_mean_plus_minus_sqrt3_std():
    images = digits(64)
    mean, std = float(images.double().mean()), float(images.double().std(correction=0))
    noise = uniform_noise(images).double()
    half_width = math.sqrt(3.0) * std
    assert float(noise.min()) >= mean - half_width - 1e-3
    assert float(noise.max()) <= mean + half_width + 1e-3
    assert float(noise.min()) < 0.0  # not clipped: MNIST-like stats need values below 0


def test_natural_crops_are_windows_of_the_grey_photograph():
    pytest.importorskip("matplotlib")
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        grey = torch.from_numpy(np.asarray(photo.convert("L"), dtype=np.float32))
    assert grey.shape == (600, 512)
    # Scale 1 and a crop the size of the photograph: the only window is the photograph.
    whole = natural_crops(2, size=(600, 512), scales=(1,))
    assert torch.equal(whole, grey.expand(2, 1, 600, 512))
    # A 290x250 window of the 300x256 copy shrunk 2x is one of its 11 x 7 windows.
    shrunk = F.interpolate(grey[None, None], size=(300, 256), mode="bilinear", antialias=True)
    crop = natural_crops(1, seed=3, size=(290, 250), scales=(2,))[0, 0]
    windows = shrunk[0, 0].unfold(0, 290, 1).unfold(1, 250, 1)  # (11, 7, 290, 250)
    assert ((windows - crop).abs().amax((-2, -1)) < 1e-3).any()


def test_natural_crops_are_seeded_28x28_in_pixel_scale():
    pytest.importorskip("matplotlib")
    crops = natural_crops(50, seed=0)
    assert crops.shape == (50, 1, 28, 28) and crops.dtype == torch.float32
    assert float(crops.min()) >= 0.0 and float(crops.max()) <= 255.0
    assert torch.equal(natural_crops(50, seed=0), crops)
    assert not torch.equal(natural_crops(50, seed=1), crops)
    assert len(torch.unique(crops.flatten(1), dim=0)) > 45  # windows rarely repeat
    with pytest.raises(ValueError, match="fit"):
        natural_crops(1, size=(300, 300), scales=(4,))


def test_natural_crops_name_the_extra_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'bayessparse\[plots\]'"):
        natural_crops(1)
    assert "natural" not in ood_sets(digits(2))


def test_ood_sets_are_deterministic_and_shaped_like_the_images():
    pytest.importorskip("matplotlib")
    images = digits(12)
    sets = ood_sets(images, seed=0, n=10)
    assert set(sets) == {"rotated_90", "inverted", "natural", *RANDOM_SETS}
    for name, images_out in sets.items():
        assert images_out.shape == (10, 1, 28, 28), name
        assert images_out.dtype == images.dtype, name
    again, other = ood_sets(images, seed=0, n=10), ood_sets(images, seed=1, n=10)
    for name in sets:
        assert torch.equal(again[name], sets[name]), name
        assert torch.equal(other[name], sets[name]) == (name not in RANDOM_SETS), name
    assert torch.equal(sets["inverted"], invert(images[:10]))
    assert torch.equal(sets["rotated_random"], rotate(images[:10], RANDOM_ROTATION, seed=0))


def test_ood_sets_go_through_the_same_preprocessing():
    images = digits(6)
    labels = torch.zeros(6, dtype=torch.long)
    for name, ood in ood_sets(images).items():
        prepared = preprocess({"train": Split(images, labels), "test": Split(ood, labels)})
        expected = ood / 256.0 - (images / 256.0).mean(0, keepdim=True)
        assert torch.allclose(prepared["test"].images, expected), name


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ood_sets(torch.zeros(4, 28, 28)), ValueError, r"\(N, 1, H, W\)"),
        (lambda: ood_sets(torch.zeros(4, 1, 28, 28, dtype=torch.uint8)), TypeError, "float"),
        (lambda: ood_sets(torch.zeros(4, 1, 28, 28), n=5), ValueError, "n <= the 4"),
        (lambda: rotate(torch.zeros(1, 1, 28, 28), (90.0, 45.0)), ValueError, "low <= high"),
        (lambda: rotate(torch.zeros(1, 1, 28, 28), math.nan), ValueError, "finite"),
        (lambda: shuffle_pixels(torch.zeros(1, 1, 28, 28), seed=0.5), TypeError, "seed"),
        (lambda: natural_crops(-1), ValueError, ">= 0"),
    ],
)
def test_ood_rejects_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
