"""``BinnedAUPRO``: AU-PRO up to an FPR limit in fixed memory, for test sets of very large anomaly maps.

anomalib's :class:`~anomalib.metrics.AUPRO` keeps every anomaly map (float32) and every mask of the test set
until ``compute()``, then concatenates them and sorts all pixels: a 4224 x 1056 MVTec AD 2 map is 17.8 MB, its
mask 4.5 MB, so a test set of a few hundred such images holds gigabytes, and the sort needs several times more.

``BinnedAUPRO`` keeps two histograms of 2^20 bins laid on the float32 bit pattern of the scores (each bin
spans 2^-11, about 0.05 %, of its value; any range or sign): the anomaly-free pixels' counts (int64) and the
anomalous pixels' PRO weights (float64, ``1 / area`` of the pixel's 8-connected ground-truth region), plus the
number of regions: 16 MiB whatever the number and size of the maps. At each bin edge the false-positive rate
and the per-region overlap are exact (they count the pixels at or above the edge), so the curve is anomalib's
exact curve sampled at the bin edges and joined linearly; it is integrated with the trapezoid rule from
``(0, 0)`` to ``fpr_limit`` (the point at the limit interpolated) and normalised by the limit, as anomalib's
AUPRO is. On maps whose scores spread over many bins the two agree to about 1e-3
(``tests/unit/metrics/test_binned_aupro.py``).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from anomalib.metrics import AnomalibMetric
from scipy import ndimage
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from .size_aupro import _area_to_limits, _as_bhw

BIN_BITS = 20
"""The histograms have 2^BIN_BITS bins (the top 20 bits of a float32's order-preserving key)."""

_SHIFT = 32 - BIN_BITS
_OFFSET = 1 << (BIN_BITS - 1)
_EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def score_bins(scores: torch.Tensor) -> torch.Tensor:
    """Bin index (``0 .. 2^20 - 1``) of each float32 score; the order of bins is the order of scores.

    Example:
        >>> import torch
        >>> bins = score_bins(torch.tensor([-1.0, 0.0, 0.5, 0.5001, 2.0]))
        >>> bool((bins[1:] >= bins[:-1]).all()), int(bins[2] == bins[3])
        (True, 1)
    """
    bits = scores.detach().to(torch.float32).contiguous().view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order
    return (key >> _SHIFT) + _OFFSET


class _BinnedAUPRO(Metric):
    """AU-PRO up to ``fpr_limit`` from two fixed-size histograms (torchmetrics metric); see the module docstring."""

    is_differentiable: bool = False
    higher_is_better: bool | None = True
    full_state_update: bool = False
    background: torch.Tensor
    overlap: torch.Tensor
    regions: torch.Tensor

    def __init__(self, fpr_limit: float = 0.05, **kwargs: Any) -> None:
        if not 0 < fpr_limit <= 1:
            msg = f"`fpr_limit` must lie in (0, 1], got {fpr_limit}."
            raise ValueError(msg)
        super().__init__(**kwargs)
        self.fpr_limit = float(fpr_limit)
        bins = 1 << BIN_BITS
        self.add_state("background", default=torch.zeros(bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("overlap", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("regions", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of anomaly maps and masks (``(B, H, W)``, ``(B, 1, H, W)`` or ``(H, W)``; masks in [0, 1])."""
        preds, target = _as_bhw(preds, "preds").float(), _as_bhw(target, "target")
        if preds.shape != target.shape:
            msg = f"Anomaly maps of shape {tuple(preds.shape)} do not match masks of {tuple(target.shape)}."
            raise ValueError(msg)
        if torch.isnan(preds).any():
            msg = "Anomaly maps contain NaN; BinnedAUPRO needs finite scores."
            raise ValueError(msg)
        masks = target > 0.5 if target.dtype != torch.bool else target
        bins = score_bins(preds.cpu())
        masks = masks.cpu()
        self.background += torch.bincount(bins[~masks], minlength=self.background.numel()).to(self.background)
        for image_bins, mask in zip(bins, masks, strict=True):
            if not mask.any():
                continue
            labels, count = ndimage.label(mask.numpy(), structure=_EIGHT_CONNECTIVITY)
            labels = torch.from_numpy(labels)[mask]
            areas = torch.bincount(labels, minlength=count + 1).to(torch.float64)
            weights = 1.0 / areas[labels]
            self.overlap += torch.bincount(image_bins[mask], weights=weights, minlength=self.overlap.numel()).to(
                self.overlap
            )
            self.regions += count

    def compute(self) -> torch.Tensor:
        """AU-PRO up to ``fpr_limit``, normalised by it; NaN (with a warning) without regions or background."""
        negatives, regions = int(self.background.sum()), int(self.regions)
        if negatives == 0 or regions == 0:
            rank_zero_warn("BinnedAUPRO is undefined (no anomaly-free pixel or no anomalous region); NaN.")
            return torch.tensor(float("nan"))
        background = self.background.cpu().double().numpy()[::-1]  # from the highest bin down
        overlap = self.overlap.cpu().double().numpy()[::-1]
        used = (background > 0) | (overlap > 0)
        fpr = np.concatenate(([0.0], np.cumsum(background)[used] / negatives))
        pro = np.concatenate(([0.0], np.cumsum(overlap)[used] / regions))
        fpr[-1] = 1.0  # every pixel is at or above the lowest edge (guards rounding of the sums)
        (area,) = _area_to_limits(fpr, np.minimum(pro, 1.0), [self.fpr_limit])
        return torch.tensor(area, dtype=torch.float32)


class BinnedAUPRO(AnomalibMetric, _BinnedAUPRO):  # type: ignore[misc]
    """AU-PRO up to an FPR limit (default 0.05, MVTec AD 2's) in fixed memory, as an anomalib metric.

    Logged as ``prefix + "AUPRO_fpr" + limit`` (``pixel_AUPRO_fpr0.05``), so that it sits beside anomalib's
    ``pixel_AUPRO`` without clashing. Reads ``anomaly_map`` and ``gt_mask`` by default; ``strict=False`` skips
    batches without masks (MVTec AD 2's private test sets).

    Args:
        fields: Batch fields of the maps and masks. Defaults to ``("anomaly_map", "gt_mask")``.
        prefix: Prefix of the logged name.
        strict: Raise if a batch lacks a field (``True``) or skip it (``False``).
        fpr_limit: Upper limit of the false-positive rate, in (0, 1].
        **kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> from anomalib.data import ImageBatch
        >>> masks = torch.zeros(1, 32, 32, dtype=torch.bool)
        >>> masks[0, 10:20, 10:20] = True
        >>> maps = torch.rand(1, 32, 32) * 0.5
        >>> maps[0, 10:20, 10:20] += 0.5  # the defect scores above every good pixel
        >>> metric = BinnedAUPRO(prefix="pixel_")
        >>> metric.update(ImageBatch(image=torch.rand(1, 3, 32, 32), anomaly_map=maps, gt_mask=masks))
        >>> metric.name, round(float(metric.compute()), 2)
        ('pixel_AUPRO_fpr0.05', 1.0)

        In a config's evaluator:

        .. code-block:: yaml

            - class_path: anomalib_transformer_student.metrics.binned_aupro.BinnedAUPRO
              init_args: {fields: [anomaly_map, gt_mask], prefix: pixel_, strict: false, fpr_limit: 0.05}
    """

    default_fields: Sequence[str] = ("anomaly_map", "gt_mask")

    def __init__(
        self,
        fields: Sequence[str] | None = None,
        prefix: str = "",
        strict: bool = True,
        fpr_limit: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(fields=fields, prefix=prefix, strict=strict, fpr_limit=fpr_limit, **kwargs)
        self.name = f"{prefix}AUPRO_fpr{fpr_limit:g}"
