"""The demo generator's defects span sizes down to spots a few pixels wide (what the size benchmark needs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset


def test_spots_are_a_few_pixels_wide_at_full_size(tmp_path: Path) -> None:
    spec = DemoDatasetSpec(categories=("gravel",), image_size=512, n_train=1, n_test_good=1, n_test_per_defect=4)
    root = generate_demo_dataset(tmp_path, spec)
    spot_widths, stain_widths = [], []
    for kind, widths in (("spot", spot_widths), ("stain", stain_widths)):
        for path in sorted((root / "gravel" / "ground_truth" / kind).glob("*.png")):
            rows, columns = np.nonzero(np.asarray(Image.open(path)))
            assert rows.size, f"{path.name} marks no defect"
            widths.append(max(np.ptp(rows), np.ptp(columns)) + 1)
    assert len(spot_widths) == 4
    assert max(spot_widths) <= 9  # a disk of radius at most 512 / 128 = 4 px
    assert min(stain_widths) > 4 * max(spot_widths)  # the sizes the subsets Q1..Q4 tell apart
