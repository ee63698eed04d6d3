"""Tiling end to end: a fit on tiles of large images (validation every epoch), its test, predict and the CLI.

Test images of 1400 x 1000 px at ``image_size`` 224 with 224-px tiles (35 tiles each, native
resolution), training images of 448 x 448 px (4 tiles each): every tile trains the students and
passes through the teacher once per fit, maps come back at 1400 x 1000, and a 5 x 5-px defect is
where the map peaks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import PredictDataset
from lightning.pytorch import seed_everything
from PIL import Image

from ...factories import TeacherCalls, make_datamodule, make_engine, small_model

pytestmark = pytest.mark.slow

HEIGHT, WIDTH, TILE = 1000, 1400, 224
TILES = 35  # 5 rows (canvas 1008 px high) x 7 columns
TRAIN_SIDE, TRAIN_TILES, N_TRAIN = 448, 4, 6
DEFECT = (613, 877)  # top-left corner (y, x) of the 5 x 5 defect
EPOCHS, VALIDATE_EVERY = 6, 3


def texture(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Grey with fine noise, ``(height, width, 3)`` uint8."""
    generator = torch.Generator().manual_seed(seed)
    image = 0.5 + 0.1 * torch.rand(height, width, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)[..., None].expand(-1, -1, 3).numpy()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec AD layout: nominal training images, one good and one defective test image with its mask."""
    root = tmp_path_factory.mktemp("large")
    category = root / "sheet"
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (category / folder).mkdir(parents=True)
    for index in range(N_TRAIN):
        Image.fromarray(texture(index, TRAIN_SIDE, TRAIN_SIDE)).save(category / "train" / "good" / f"{index:03d}.png")
    Image.fromarray(texture(10)).save(category / "test" / "good" / "000.png")
    defective, mask = texture(11), np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    y, x = DEFECT
    defective[y : y + 5, x : x + 5] = 0
    mask[y : y + 5, x : x + 5] = 255
    Image.fromarray(defective).save(category / "test" / "spot" / "000.png")
    Image.fromarray(mask).save(category / "ground_truth" / "spot" / "000_mask.png")
    return root


def test_fit_test_and_predict_on_tiles(dataset: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = small_model(image_size=TILE, layers=(1, 3), tiling={"tile_size": TILE}, lr=1e-3)
    assert model.tiling.layout(HEIGHT, WIDTH).count == TILES
    tiles_seen = TeacherCalls(model)
    datamodule = make_datamodule(dataset, category="sheet", batch_size=2, eval_batch_size=1)
    engine = make_engine(tmp_path, max_epochs=EPOCHS, check_val_every_n_epoch=VALIDATE_EVERY)
    engine.fit(model, datamodule=datamodule)
    # Every tile of the training and the 2 evaluation images, once: later epochs and validations read the cache.
    distinct_tiles = N_TRAIN * TRAIN_TILES + 2 * TILES
    assert tiles_seen.images == distinct_tiles
    (metrics,) = engine.test(model, datamodule=datamodule)
    assert tiles_seen.images == distinct_tiles
    assert metrics["image_AUROC"] == 1.0  # the defective image scores above the good one

    predictions = engine.predict(model, dataset=PredictDataset(dataset / "sheet" / "test" / "spot"))
    (batch,) = predictions
    anomaly_map = batch.anomaly_map.reshape(HEIGHT, WIDTH)
    peak = divmod(int(anomaly_map.argmax()), WIDTH)
    centre = (DEFECT[0] + 2, DEFECT[1] + 2)
    assert max(abs(peak[0] - centre[0]), abs(peak[1] - centre[1])) <= 7, (peak, centre)
