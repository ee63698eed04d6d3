"""Generated MVTec AD 2 trees for the tests: private test sets of all 8 categories, and submission folders.

Names are MVTec's (``000_regular`` in ``test_private``, ``000_mixed`` in ``test_private_mixed``); counts are MVTec's
scaled down (:data:`SCALED_COUNTS`), which the checks take as a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from anomalib_transformer_student.apps.mvtecad2_submission import (
    IMAGE_COUNTS,
    MAPS_FOLDER,
    MASKS_FOLDER,
    TEST_SETS,
    image_names,
)

# MVTec's counts divided by about 100, at least 1: can 3, fabric 3, ..., sheet_metal 1.
SCALED_COUNTS = {category: max(1, round(count / 100)) for category, count in IMAGE_COUNTS.items()}
# Divided by about 200, for tests that run a model on every image: can 2, fabric 2, the others 1.
TINY_COUNTS = {category: max(1, round(count / 200)) for category, count in IMAGE_COUNTS.items()}


def write_private_test_sets(root: Path, counts: Mapping[str, int] = SCALED_COUNTS, size: tuple[int, int] = (28, 42),
                            seed: int = 0) -> Path:  # fmt: skip
    """``root/<category>/test_private/000_regular.png`` ... and ``test_private_mixed/000_mixed.png`` ..., RGB noise."""
    rng = np.random.default_rng(seed)
    for category, count in counts.items():
        for split in TEST_SETS:
            folder = root / category / split
            folder.mkdir(parents=True)
            for name in image_names(split, count, ".png"):
                pixels = (128 + 20 * rng.standard_normal((*size, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / name)
    return root


def write_submission(root: Path, counts: Mapping[str, int] = SCALED_COUNTS, size: tuple[int, int] = (3, 4)) -> Path:
    """A submission folder that passes every rule: float16 TIFF maps and 0/255 PNG masks for all 8 categories."""
    for category, count in counts.items():
        for split in TEST_SETS:
            for top, extension in ((MAPS_FOLDER, ".tiff"), (MASKS_FOLDER, ".png")):
                folder = root / top / category / split
                folder.mkdir(parents=True)
                for name in image_names(split, count, extension):
                    if top == MAPS_FOLDER:
                        tifffile.imwrite(folder / name, np.full(size, 0.5, np.float16))
                    else:
                        Image.fromarray(np.zeros(size, np.uint8)).save(folder / name)
    return root
