"""Out-of-distribution (OOD) image sets for MNIST models, built offline from tensors.

Every set has the shape of MNIST images, (N, 1, 28, 28), in raw pixel scale (MNIST's
0..255), so the same :func:`bayessparse.data.preprocess` applies to it as to the test
set. All of them are deterministic given ``seed`` (a private ``torch.Generator``; the
global random state is neither used nor changed).

* :func:`rotate`: rotated digits (a fixed angle, or a random angle per image);
* :func:`invert`: ``255 - x``, white digits become black on white;
* :func:`shuffle_pixels`: each image's pixels in a random order (same histogram, no shape);
* :func:`uniform_noise`, :func:`gaussian_noise`: noise with the images' pixel mean and std;
* :func:`natural_crops`: grey-scale crops of a photograph that ships with matplotlib
  (needs ``pip install 'bayessparse[plots]'``).

:func:`ood_sets` returns them all.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gaussian_noise",
    "invert",
    "natural_crops",
    "ood_sets",
    "rotate",
    "shuffle_pixels",
    "uniform_noise",
]

MAX_PIXEL = 255.0
RANDOM_ROTATION = (45.0, 315.0)  # at least 45 degrees from upright either way
NATURAL_IMAGE = "grace_hopper.jpg"
NATURAL_SCALES = (2, 4, 8)
_PLOTS_HINT = "pip install 'bayessparse[plots]'"


def ood_sets(images: Tensor, *, seed: int = 0, n: int | None = None) -> dict[str, Tensor]:
    """All OOD sets built from ``images``, each of shape (n, 1, H, W).

    Args:
        images: in-distribution images (N, 1, H, W) in raw pixel scale, e.g.
            ``load_mnist()["test"].images``.
        seed: seed of every set's random draws.
        n: images per set: the first ``n`` of ``images`` are transformed, and the noise
            and crops match them in number; ``None`` uses all ``N``.

    Returns:
        ``rotated_90`` (:func:`rotate` by 90 degrees), ``rotated_random`` (by a random angle
        per image in ``RANDOM_ROTATION``), ``inverted``, ``shuffled``, ``uniform_noise``,
        ``gaussian_noise`` and, when matplotlib is importable, ``natural`` (28x28 crops by
        :func:`natural_crops`; left out silently without matplotlib, so check for the key).
    """
    _check_images(images)
    if n is not None:
        _check_count(n)
        if n > len(images):
            raise ValueError(
                f"Expected n <= the {len(images)} images given, got {n!r}. "
                "Pass more images or a smaller n."
            )
        images = images[:n]
    sets = {
        "rotated_90": rotate(images, 90.0),
        "rotated_random": rotate(images, RANDOM_ROTATION, seed=seed),
        "inverted": invert(images),
        "shuffled": shuffle_pixels(images, seed=seed),
        "uniform_noise": uniform_noise(images, seed=seed),
        "gaussian_noise": gaussian_noise(images, seed=seed),
    }
    if _has_matplotlib():
        size = (images.shape[-2], images.shape[-1])
        crops = natural_crops(len(images), seed=seed, size=size)
        sets["natural"] = crops.to(images.device, images.dtype)
    return sets


def rotate(images: Tensor, degrees: float | tuple[float, float], *, seed: int = 0) -> Tensor:
    """Images rotated counter-clockwise about their centre, with bilinear interpolation.

    Corners that rotate in from outside the image are 0 (MNIST's background). Multiples
    of 90 degrees move pixel centres onto pixel centres, so they match ``torch.rot90``
    up to rounding.

    Args:
        images: (N, 1, H, W) in raw pixel scale.
        degrees: one angle for all images, or ``(low, high)``: a random angle per image,
            uniform in [low, high), drawn with ``seed``.
        seed: seed of the random angles (unused for a fixed angle).
    """
    _check_images(images)
    n = len(images)
    if isinstance(degrees, tuple):
        low, high = _check_range(degrees)
        draw = torch.rand(n, generator=_generator(seed), dtype=torch.float64)
        angles = low + (high - low) * draw
    else:
        if not (isinstance(degrees, (int, float)) and math.isfinite(degrees)):
            raise ValueError(
                f"Expected degrees as a finite number or a (low, high) pair, got {degrees!r}."
            )
        angles = torch.full((n,), float(degrees), dtype=torch.float64)
    radians = angles.deg2rad()
    cos, sin = radians.cos(), radians.sin()
    zero = torch.zeros_like(cos)
    # affine_grid maps output to input coordinates (x right, y down, in [-1, 1]); this
    # matrix turns the picture counter-clockwise as displayed, as torch.rot90 with k=1.
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def invert(images: Tensor) -> Tensor:
    """``255 - x``: dark strokes on a white background, pixel for pixel."""
    _check_images(images)
    return MAX_PIXEL - images


def shuffle_pixels(images: Tensor, *, seed: int = 0) -> Tensor:
    """Each image with its pixels in a random order of its own, drawn with ``seed``.

    The pixel histogram (so mean, std and stroke mass) of each image is kept; its shape
    is gone.
    """
    _check_images(images)
    flat = images.flatten(1)
    # argsort of i.i.d. uniforms: one uniform random permutation per row, all at once.
    order = torch.rand(flat.shape, generator=_generator(seed)).argsort(1).to(images.device)
    return flat.gather(1, order).view_as(images)


def uniform_noise(images: Tensor, *, seed: int = 0) -> Tensor:
    """I.i.d. uniform noise with the pixel mean ``m`` and std ``s`` of ``images``.

    Uniform on ``[m - sqrt(3) s, m + sqrt(3) s]``, which has mean ``m`` and std ``s``.
    For MNIST (``m`` about 33, ``s`` about 79) that runs below 0: values are not clipped
    to 0..255, which would change the mean and std, and ``preprocess`` is affine, so the
    noise keeps them after preprocessing too.
    """
    mean, std = _pixel_stats(images)
    draw = torch.rand(images.shape, generator=_generator(seed), dtype=torch.float64)
    noise = mean + math.sqrt(3.0) * std * (2.0 * draw - 1.0)
    return noise.to(images.device, images.dtype)


def gaussian_noise(images: Tensor, *, seed: int = 0) -> Tensor:
    """I.i.d. Gaussian noise with the pixel mean and std of ``images`` (not clipped).

    See :func:`uniform_noise` on the range.
    """
    mean, std = _pixel_stats(images)
    draw = torch.randn(images.shape, generator=_generator(seed), dtype=torch.float64)
    return (mean + std * draw).to(images.device, images.dtype)


def natural_crops(
    n: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (28, 28),
    image: str = NATURAL_IMAGE,
    scales: tuple[int, ...] = NATURAL_SCALES,
) -> Tensor:
    """Grey-scale crops of a photograph shipped with matplotlib, in pixel scale 0..255.

    The photograph (by default ``grace_hopper.jpg``, 512x600) is converted to grey with
    PIL (ITU-R 601-2 luma), shrunk by each factor in ``scales`` (antialiased, so finer
    and coarser structure both appear), and each crop is a random ``size`` window of a
    random one of these shrunken copies.

    Args:
        n: number of crops.
        seed: seed of the random windows.
        size: (height, width) of a crop.
        image: a sample image name for ``matplotlib.cbook.get_sample_data``.
        scales: shrink factors, each leaving the photograph at least ``size`` large.

    Returns:
        float32 tensor (n, 1, height, width).

    Raises:
        ImportError: matplotlib (with its dependency pillow) is not installed.
    """
    _check_count(n)
    levels = [_shrunk(_photograph(image), scale, size) for scale in scales]
    if not levels:
        raise ValueError(f"Expected at least one scale, got {scales!r}. Pass e.g. (2, 4, 8).")
    heights = torch.tensor([level.shape[0] for level in levels])
    widths = torch.tensor([level.shape[1] for level in levels])
    starts = torch.cumsum(heights * widths, 0) - heights * widths
    pixels = torch.cat([level.flatten() for level in levels])
    generator = _generator(seed)
    level = torch.randint(len(levels), (n,), generator=generator)
    # Top-left corners uniform over every window that fits in the chosen copy.
    top = (torch.rand(n, generator=generator) * (heights[level] - size[0] + 1)).long()
    left = (torch.rand(n, generator=generator) * (widths[level] - size[1] + 1)).long()
    rows = top[:, None, None] + torch.arange(size[0])[None, :, None]
    cols = left[:, None, None] + torch.arange(size[1])[None, None, :]
    index = starts[level][:, None, None] + rows * widths[level][:, None, None] + cols
    return pixels[index].unsqueeze(1)


def _photograph(name: str) -> Tensor:
    """The grey-scale sample image ``name`` (H, W) as float32 in 0..255."""
    try:
        from matplotlib import cbook
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            f"natural_crops reads a photograph that ships with matplotlib: {_PLOTS_HINT}."
        ) from err
    with Image.open(cbook.get_sample_data(name, asfileobj=False)) as photo:
        grey = np.asarray(photo.convert("L"), dtype=np.float32)
    return torch.from_numpy(grey)


def _shrunk(photo: Tensor, scale: int, size: tuple[int, int]) -> Tensor:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"Expected each scale as an integer >= 1, got {scale!r}.")
    shape = (photo.shape[0] // scale, photo.shape[1] // scale)
    if shape[0] < size[0] or shape[1] < size[1]:
        raise ValueError(
            f"Expected crops of size {size} to fit the photograph shrunk {scale}x to {shape}. "
            "Use smaller scales or a smaller size."
        )
    shrunk = F.interpolate(photo[None, None], size=shape, mode="bilinear", antialias=True)
    return shrunk[0, 0].clamp(0.0, MAX_PIXEL)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Expected seed as an int, got {seed!r}. Pass e.g. seed=0.")
    return torch.Generator().manual_seed(seed)


def _pixel_stats(images: Tensor) -> tuple[float, float]:
    """Mean and (population) std over all pixels of ``images``."""
    _check_images(images)
    if images.numel() == 0:
        raise ValueError("Expected at least one image to take the pixel mean and std of, got 0.")
    pixels = images.double()
    return float(pixels.mean()), float(pixels.std(correction=0))


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        kind = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(
            f"Expected images as a floating-point torch.Tensor, got {kind!r}. Pass raw "
            "pixel values as load_mnist returns them (float32)."
        )
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"Expected grey-scale images of shape (N, 1, H, W), got {tuple(images.shape)!r}. "
            "Add the channel dimension with images.unsqueeze(1)."
        )


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"Expected n as an integer >= 0, got {n!r}.")


def _check_range(degrees: tuple[float, float]) -> tuple[float, float]:
    if len(degrees) != 2 or not all(math.isfinite(d) for d in degrees) or degrees[0] > degrees[1]:
        raise ValueError(
            f"Expected degrees as (low, high) with finite low <= high, got {degrees!r}. "
            "Pass e.g. (45.0, 315.0)."
        )
    return float(degrees[0]), float(degrees[1])
