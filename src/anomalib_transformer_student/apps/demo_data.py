"""A small MVTec-AD-layout dataset made from real photographs shipped with scikit-image.

Nominal images are random crops of the brick, grass and gravel textures; defective ones get
synthetic defects (stains, scratches and tiny spots a few pixels wide) with exact masks.
Everything is generated offline and reproducibly from a seed.

:func:`generate_large_image_dataset` writes large images (1344 px by default) of the textures at their
native scale, mirror-tiled, with only tiny spots (a few pixels across) as defects: the case that tiling
(``TransformerStudent(tiling={"tile_size": ...})``) is for, where resizing the whole image would shrink a spot below
one pixel.

Layout (as anomalib's ``MVTecAD`` datamodule expects)::

    root/<category>/train/good/000.png
    root/<category>/test/good/000.png
    root/<category>/test/<defect>/000.png
    root/<category>/ground_truth/<defect>/000_mask.png
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data
from skimage import draw, transform

TEXTURES: dict[str, Callable[[], np.ndarray]] = {
    "brick": skimage_data.brick,
    "grass": skimage_data.grass,
    "gravel": skimage_data.gravel,
}
DEFECT_TYPES = ("stain", "scratch", "spot")
# A per-texture colour tint so that the three categories do not look alike in the report grid.
TINTS = {"brick": (1.0, 0.78, 0.62), "grass": (0.7, 1.0, 0.6), "gravel": (0.92, 0.92, 1.0)}


@dataclass(frozen=True)
class DemoDatasetSpec:
    """What to generate.

    Args:
        categories: Texture names, a subset of ``TEXTURES``.
        image_size: Side of each square image in pixels.
        n_train: Nominal training images per category.
        n_test_good: Nominal test images per category.
        n_test_per_defect: Defective test images per defect type and category.
        seed: Seed of every random choice.
    """

    categories: Sequence[str] = ("brick", "grass", "gravel")
    image_size: int = 256
    n_train: int = 12
    n_test_good: int = 4
    n_test_per_defect: int = 3
    seed: int = 0


def _texture(name: str) -> np.ndarray:
    if name not in TEXTURES:
        msg = f"Unknown demo texture '{name}'; choose from {sorted(TEXTURES)}."
        raise ValueError(msg)
    gray = TEXTURES[name]().astype(np.float32) / 255.0
    return np.stack([gray * tint for tint in TINTS[name]], axis=-1).clip(0, 1)


def _nominal_crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop (about half the texture's side) resized to ``size``, randomly flipped."""
    side = min(texture.shape[:2])
    crop = int(side * rng.uniform(0.45, 0.6))
    top, left = rng.integers(0, texture.shape[0] - crop + 1), rng.integers(0, texture.shape[1] - crop + 1)
    patch = texture[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return transform.resize(patch, (size, size), order=1, anti_aliasing=True).astype(np.float32)


def _defect_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    margin = max(2, size // 10)
    centre_r, centre_c = rng.integers(margin, size - margin, size=2)
    if kind == "stain":
        radius_r, radius_c = rng.uniform(0.04, 0.1, size=2) * size
        rows, cols = draw.ellipse(
            centre_r, centre_c, radius_r, radius_c, shape=mask.shape, rotation=rng.uniform(0, np.pi)
        )
    elif kind == "scratch":
        length = rng.uniform(0.15, 0.35) * size
        angle = rng.uniform(0, np.pi)
        end_r = int(np.clip(centre_r + length * np.sin(angle), 0, size - 1))
        end_c = int(np.clip(centre_c + length * np.cos(angle), 0, size - 1))
        rows, cols = draw.line(centre_r, centre_c, end_r, end_c)
        mask[rows, cols] = True
        # Thicken to about 1 % of the image side so that the scratch survives resizing.
        width = max(1, size // 100)
        rows, cols = np.nonzero(mask)
        rows = np.clip(rows[:, None] + np.arange(-width, width + 1)[None, :], 0, size - 1).ravel()
        cols = np.repeat(cols, 2 * width + 1)
    else:  # spot: tiny, a few pixels wide at full size
        radius = rng.uniform(1.5, max(2.0, size / 128))
        rows, cols = draw.disk((centre_r, centre_c), radius, shape=mask.shape)
    mask[rows, cols] = True
    return mask


def _apply_defect(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    colour = rng.uniform(0, 1, size=3).astype(np.float32)
    if np.abs(colour - image[mask].mean(axis=0)).max() < 0.35:
        colour = 1.0 - colour
    defective = image.copy()
    defective[mask] = 0.15 * image[mask] + 0.85 * colour
    return defective


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.clip(0, 1) * 255).round().astype(np.uint8)).save(path)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _save_nominal_images(folder: Path, n_train: int, n_test_good: int, make: Callable[[], np.ndarray]) -> None:
    """Write ``n_train`` training and ``n_test_good`` good test images of a category, each made by ``make()``."""
    for index in range(n_train):
        _save(make(), folder / "train" / "good" / f"{index:03d}.png")
    for index in range(n_test_good):
        _save(make(), folder / "test" / "good" / f"{index:03d}.png")


def generate_demo_dataset(root: str | Path, spec: DemoDatasetSpec | None = None) -> Path:
    """Write the dataset under ``root`` (one folder per category) and return ``root``.

    Example:
        >>> root = generate_demo_dataset("datasets/demo", DemoDatasetSpec(categories=("brick",), image_size=64))
        >>> sorted(p.name for p in (root / "brick" / "test").iterdir())
        ['good', 'scratch', 'spot', 'stain']
    """
    spec = spec or DemoDatasetSpec()
    root = Path(root)
    for offset, category in enumerate(spec.categories):
        rng = np.random.default_rng([spec.seed, offset])
        texture = _texture(category)
        folder = root / category
        nominal = partial(_nominal_crop, texture, spec.image_size, rng)
        _save_nominal_images(folder, spec.n_train, spec.n_test_good, nominal)
        for kind in DEFECT_TYPES:
            for index in range(spec.n_test_per_defect):
                mask = _defect_mask(kind, spec.image_size, rng)
                image = _apply_defect(_nominal_crop(texture, spec.image_size, rng), mask, rng)
                _save(image, folder / "test" / kind / f"{index:03d}.png")
                _save_mask(mask, folder / "ground_truth" / kind / f"{index:03d}_mask.png")
    return root


@dataclass(frozen=True)
class LargeImageSpec:
    """What :func:`generate_large_image_dataset` generates: large images with tiny spots only.

    Args:
        categories: Texture names, a subset of ``TEXTURES``.
        image_size: Side of each square image in pixels; the texture keeps its native scale (mirror-tiled).
        n_train: Nominal training images per category.
        n_test_good: Nominal test images per category.
        n_test_per_defect: Defective test images (defect type ``spot``) per category.
        spots_per_image: Least and most spots on a defective image.
        spot_radius: Least and most radius of a spot in pixels.
        seed: Seed of every random choice.
    """

    categories: Sequence[str] = ("gravel",)
    image_size: int = 1344
    n_train: int = 8
    n_test_good: int = 4
    n_test_per_defect: int = 6
    spots_per_image: tuple[int, int] = (1, 3)
    spot_radius: tuple[float, float] = (1.5, 3.0)
    seed: int = 0


def _native_mosaic(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` x ``size`` of the texture at its native scale, mirror-tiled, from a random offset.

    Mirror tiling repeats every ``2 * side`` pixels, and a flipped texture's tiling is the same tiling
    shifted by ``side``: the random offset within one period covers the flips too.
    """
    height, width = texture.shape[:2]
    top, left = int(rng.integers(0, 2 * height)), int(rng.integers(0, 2 * width))
    padding = ((0, top + size - height), (0, left + size - width), (0, 0))
    tiled = np.pad(texture, tuple((before, max(0, after)) for before, after in padding), mode="symmetric")
    return np.ascontiguousarray(tiled[top : top + size, left : left + size])


def _spot_masks(spec: LargeImageSpec, rng: np.random.Generator) -> list[np.ndarray]:
    """One mask per spot: disks of ``spec.spot_radius``, apart from each other and from the border."""
    size, (least, most) = spec.image_size, spec.spots_per_image
    low, high = spec.spot_radius
    margin = int(np.ceil(high)) + 2
    masks: list[np.ndarray] = []
    centres: list[np.ndarray] = []
    for _ in range(int(rng.integers(least, most + 1))):
        for _attempt in range(100):  # spots must not touch, so that each is one region of its own size
            centre = rng.integers(margin, size - margin, size=2)
            if all(np.abs(centre - other).max() > 2 * margin for other in centres):
                break
        else:
            continue
        mask = np.zeros((size, size), dtype=bool)
        mask[draw.disk(tuple(centre), rng.uniform(low, high), shape=mask.shape)] = True
        masks.append(mask)
        centres.append(centre)
    return masks


def generate_large_image_dataset(root: str | Path, spec: LargeImageSpec | None = None) -> Path:
    """Write large images with tiny spots under ``root`` (MVTec AD layout, defect type ``spot``); return ``root``.

    Every image is a texture at its native scale, mirror-tiled to ``spec.image_size`` from a random
    offset (nothing is resized). Defective test images carry ``spec.spots_per_image`` spots of
    ``spec.spot_radius`` pixels, each its own colour; their masks mark exactly the changed pixels.

    Example:
        >>> import tempfile
        >>> spec = LargeImageSpec(image_size=64, n_train=1, n_test_good=1, n_test_per_defect=1)
        >>> root = generate_large_image_dataset(tempfile.mkdtemp(), spec)
        >>> sorted(p.name for p in (root / "gravel" / "test").iterdir())
        ['good', 'spot']
    """
    spec = spec or LargeImageSpec()
    if spec.spots_per_image[0] < 1 or spec.image_size < 4 * (spec.spot_radius[1] + 2):
        msg = f"LargeImageSpec needs at least one spot and images far larger than a spot, got {spec}."
        raise ValueError(msg)
    root = Path(root)
    for offset, category in enumerate(spec.categories):
        rng = np.random.default_rng([spec.seed, offset])
        texture = _texture(category)
        folder = root / category
        nominal = partial(_native_mosaic, texture, spec.image_size, rng)
        _save_nominal_images(folder, spec.n_train, spec.n_test_good, nominal)
        for index in range(spec.n_test_per_defect):
            image = _native_mosaic(texture, spec.image_size, rng)
            masks = _spot_masks(spec, rng)
            for mask in masks:
                image = _apply_defect(image, mask, rng)
            _save(image, folder / "test" / "spot" / f"{index:03d}.png")
            _save_mask(np.logical_or.reduce(masks), folder / "ground_truth" / "spot" / f"{index:03d}_mask.png")
    return root
