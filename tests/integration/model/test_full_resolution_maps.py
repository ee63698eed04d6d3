"""A defect in a large non-square image is found where it was drawn, at the image's own resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ...factories import make_datamodule, make_engine, small_model

HEIGHT, WIDTH = 1000, 1500
DEFECT_CENTRE, DEFECT_HALF_SIDE = (280, 1150), 60


def _nominal(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:HEIGHT, 0:WIDTH] / 60.0
    shade = 0.5 + 0.15 * np.sin(columns + rng.uniform(0, 6)) * np.cos(0.7 * rows + rng.uniform(0, 6))
    image = np.stack([shade, 0.9 * shade, 0.8 * shade], axis=-1) + rng.normal(0, 0.03, (HEIGHT, WIDTH, 3))
    return (image.clip(0, 1) * 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec-AD layout, 1500 x 1000 images: four nominal for training, one nominal and one defective to test."""
    root = tmp_path_factory.mktemp("wide")
    for index in range(4):
        _save(_nominal(index), root / "wide" / "train" / "good" / f"{index:03d}.png")
    _save(_nominal(10), root / "wide" / "test" / "good" / "000.png")
    image, mask = _nominal(11), np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    (row, column), half = DEFECT_CENTRE, DEFECT_HALF_SIDE
    mask[row - half : row + half, column - half : column + half] = 255
    image[mask > 0] = (255, 0, 255)
    _save(image, root / "wide" / "test" / "stain" / "000.png")
    _save(mask, root / "wide" / "ground_truth" / "stain" / "000_mask.png")
    return root


def test_defect_in_a_non_square_image_peaks_where_it_was_drawn(wide_dataset: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_model(image_size=224, lr=1e-3, feature_cache={"dir": str(tmp_path)})
    datamodule = make_datamodule(wide_dataset, category="wide", batch_size=2)
    engine = make_engine(tmp_path, max_epochs=3, check_val_every_n_epoch=3)
    engine.fit(model, datamodule=datamodule)

    batch = next(iter(engine.predict(model, datamodule=datamodule)))
    assert batch.image.shape[-2:] == batch.gt_mask.shape[-2:] == (HEIGHT, WIDTH)
    defective = next(index for index, path in enumerate(batch.image_path) if "stain" in path)
    anomaly_map = batch.anomaly_map[defective].squeeze()
    assert anomaly_map.shape == (HEIGHT, WIDTH)
    row, column = divmod(int(anomaly_map.argmax()), WIDTH)
    # A wrong crop would shift the peak by the 250 px of vertical padding.
    assert abs(row - DEFECT_CENTRE[0]) < 100
    assert abs(column - DEFECT_CENTRE[1]) < 100

    (metrics,) = engine.test(model, datamodule=datamodule)
    assert metrics["pixel_AUROC"] > 0.9
