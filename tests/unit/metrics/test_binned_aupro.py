"""BinnedAUPRO: anomalib's AUPRO at FPR 0.05 in fixed memory, batch by batch."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics.aupro import _AUPRO as AUPRO

from anomalib_transformer_student.metrics.binned_aupro import BinnedAUPRO, score_bins


def _maps_and_masks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(6, 64, 96, dtype=torch.bool)
    masks[0, 5:8, 5:9] = True
    masks[1, 30:50, 40:70] = True
    masks[1, 2:4, 90:93] = True
    masks[3, 60:64, 0:2] = True
    maps = torch.rand(6, 64, 96, generator=generator)
    maps = maps + 0.6 * masks * torch.rand(6, 64, 96, generator=generator)
    return maps, masks


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3])
def test_matches_anomalibs_aupro(fpr_limit: float) -> None:
    """Updated batch by batch, the binned curve gives anomalib's AUPRO (which keeps every map) to 1e-3."""
    maps, masks = _maps_and_masks(0)
    reference = AUPRO(fpr_limit=fpr_limit)
    reference.update(maps, masks.int())
    binned = BinnedAUPRO(prefix="pixel_", fpr_limit=fpr_limit)
    for start in range(0, 6, 2):
        batch = ImageBatch(image=torch.zeros(2, 3, 64, 96), anomaly_map=maps[start : start + 2],
                           gt_mask=masks[start : start + 2])  # fmt: skip
        binned.update(batch)
    expected, actual = float(reference.compute()), float(binned.compute())
    assert 0.05 < expected < 0.95
    assert actual == pytest.approx(expected, abs=1e-3)
    assert binned.name == f"pixel_AUPRO_fpr{fpr_limit:g}"


def test_state_is_fixed_size() -> None:
    """The state does not grow with the number of maps (anomalib's AUPRO stores every one)."""
    metric = BinnedAUPRO()
    sizes = []
    for seed in range(3):
        maps, masks = _maps_and_masks(seed)
        metric.update(ImageBatch(image=torch.zeros(6, 3, 64, 96), anomaly_map=maps, gt_mask=masks))
        sizes.append(sum(state.numel() for state in (metric.background, metric.overlap, metric.regions)))
    assert sizes[0] == sizes[-1] == 2 * 2**20 + 1
    assert int(metric.regions) == 3 * 4


def test_bins_keep_the_order_of_scores() -> None:
    """Negative, zero and positive scores fall in non-decreasing bins; nearby values share a bin."""
    scores = torch.tensor([-3.0, -1e-3, 0.0, 1e-6, 0.5, 0.50001, 7.0])
    bins = score_bins(scores)
    assert bool((bins[1:] >= bins[:-1]).all()) and int(bins[4]) == int(bins[5])
    assert int(bins.min()) >= 0 and int(bins.max()) < 2**20


def test_undefined_without_regions_is_nan() -> None:
    """No defect in any mask: AU-PRO is undefined."""
    metric = BinnedAUPRO()
    metric.update(
        ImageBatch(
            image=torch.zeros(1, 3, 8, 8),
            anomaly_map=torch.rand(1, 8, 8),
            gt_mask=torch.zeros(1, 8, 8, dtype=torch.bool),
        )
    )
    with pytest.warns(UserWarning, match="undefined"):
        assert torch.isnan(metric.compute())
