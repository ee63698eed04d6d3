"""The large-image generator: native-scale mirror-tiled textures, tiny spots, exact masks, MVTec AD layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anomalib_transformer_student.apps.demo_data import LargeImageSpec, _texture, generate_large_image_dataset

SIZE = 200
SPEC = LargeImageSpec(categories=("gravel",), image_size=SIZE, n_train=2, n_test_good=1, n_test_per_defect=4)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_large_image_dataset(tmp_path_factory.mktemp("large"), SPEC)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _mirror_period() -> np.ndarray:
    """The texture as saved (uint8), mirror-tiled over one period plus one image side."""
    texture = (_texture("gravel") * 255).round().astype(np.uint8)
    height, width = texture.shape[:2]
    return np.pad(texture, ((0, height + SIZE), (0, width + SIZE), (0, 0)), mode="symmetric")


def _native_origin(image: np.ndarray, period: np.ndarray, ignore: np.ndarray) -> tuple[int, int] | None:
    """Where ``image`` (outside ``ignore``) is a crop of the mirror-tiled texture, or ``None``."""
    rows, columns = np.nonzero(~ignore[:-3, :-3] & ~ndimage.binary_dilation(ignore, iterations=3)[:-3, :-3])
    y, x = int(rows[0]), int(columns[0])  # a 3 x 3 block without a spot
    block = image[y : y + 3, x : x + 3, 0]
    span = period.shape[0] - SIZE  # one mirror period: every offset the generator draws
    hits = np.ones((span, span), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            hits &= period[y + dy : y + dy + span, x + dx : x + dx + span, 0] == block[dy, dx]
    for top, left in zip(*np.nonzero(hits), strict=True):
        crop = period[top : top + SIZE, left : left + SIZE]
        if crop.shape[:2] == image.shape[:2] and (crop[~ignore] == image[~ignore]).all():
            return int(top), int(left)
    return None


def test_layout_and_sizes(root: Path) -> None:
    folder = root / "gravel"
    assert sorted(p.name for p in (folder / "test").iterdir()) == ["good", "spot"]
    assert len(list((folder / "train" / "good").glob("*.png"))) == 2
    assert len(list((folder / "test" / "good").glob("*.png"))) == 1
    images = sorted((folder / "test" / "spot").glob("*.png"))
    masks = sorted((folder / "ground_truth" / "spot").glob("*_mask.png"))
    assert [p.stem for p in images] == [p.stem.removesuffix("_mask") for p in masks] == ["000", "001", "002", "003"]
    for path in [*folder.glob("train/good/*.png"), *images]:
        assert _load(path).shape == (SIZE, SIZE, 3)
    for path in masks:
        assert _load(path).shape == (SIZE, SIZE)


def test_spots_are_a_few_tiny_regions(root: Path) -> None:
    for path in sorted((root / "gravel" / "ground_truth" / "spot").glob("*.png")):
        mask = _load(path)
        assert set(np.unique(mask)) == {0, 255}
        labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3)))
        assert 1 <= count <= 3, f"{path.name}: {count} regions"
        areas = np.bincount(labels.ravel())[1:]
        assert areas.min() >= 1 and areas.max() <= 40, f"{path.name}: areas {areas}"


def test_images_are_native_scale_and_masks_exact(root: Path) -> None:
    period = _mirror_period()
    nominal = _load(root / "gravel" / "train" / "good" / "000.png")
    no_mask = np.zeros((SIZE, SIZE), dtype=bool)
    assert _native_origin(nominal, period, no_mask) is not None, "nominal image is not the texture at native scale"
    for path in sorted((root / "gravel" / "test" / "spot").glob("*.png")):
        image, mask = _load(path), _load(root / "gravel" / "ground_truth" / "spot" / f"{path.stem}_mask.png") > 0
        origin = _native_origin(image, period, mask)
        assert origin is not None, f"{path.name}: outside the mask, not the native texture"
        top, left = origin
        changed = (image != period[top : top + SIZE, left : left + SIZE]).any(-1)
        assert not (changed & ~mask).any()
        assert changed.sum() >= 0.8 * mask.sum(), f"{path.name}: the mask marks pixels the spot left unchanged"


def test_images_differ(root: Path) -> None:
    first, second = (_load(root / "gravel" / "train" / "good" / f"{i:03d}.png") for i in range(2))
    assert not np.array_equal(first, second)
