"""Defect-size robustness of the per-region overlap: AUPRO stratified by defect size.

Costanzino et al., "Learning to Be a Transformer to Pinpoint Anomalies" (IEEE Access, 2025) measure how
well a detector localises small defects by computing AUPRO on subsets of the ground-truth regions of a
category, grouped by region area:

1. The ground-truth regions of every mask are labelled with 8-connectivity, at the resolution given.
2. The 25th, 50th and 75th percentiles of all region areas (in pixels, over all test images of one metric
   instance, i.e. one category) split the regions into cumulative subsets: ``Q1`` (area <= p25, the
   tiniest defects), ``Q2`` (area <= p50), ``Q3`` (area <= p75) and ``Q4`` (all regions).
3. For each subset, AUPRO is computed at the FPR limits 0.30, 0.10, 0.05 and 0.01. The false-positive rate
   always counts over all anomaly-free pixels of all test images, so every subset shares the same FPR axis;
   the PRO curve is the mean, over the regions of the subset, of the fraction of each region's pixels that
   are at or above the threshold.

Two PRO curves are available (``curve``); both are integrated with the trapezoid rule up to the FPR limit,
the point at the limit linearly interpolated, and normalised by the limit:

* ``"exact"`` (default) follows :class:`anomalib.metrics.AUPRO` exactly: one curve point per distinct score
  (ties move FPR and PRO together, giving a diagonal segment) and a ``(0, 0)`` start point. ``Q4`` at FPR
  0.30 is therefore anomalib's ``AUPRO(fpr_limit=0.3)``. The curve is evaluated without binning the
  thresholds: background scores are sorted once, and the curve is reduced to the points where the PRO
  changes (the points in between are collinear and change neither the area nor the interpolation), so the
  cost is one sort of the background scores plus one sort of the anomalous scores.
* ``"authors"`` is the curve behind the paper's tables (``calculate_au_pro`` of the authors' code, derived
  from the MVTec 3D-AD evaluation script): 99 thresholds at equal steps over the sorted anomaly-free scores
  (positions ``floor(i * (N - 1) / 98)``), each giving the point FPR ``1 - (position + 1) / N`` (the rank of
  the threshold, which ignores ties) and PRO the mean fraction of region pixels strictly above it, plus the
  point ``(1, 1)``. Its points lie about 0.0102 apart in FPR, so it agrees with the exact curve to about
  0.01 at FPR 0.30 but less at the small limits: below 0.01 it has only its FPR-0 point, and the linear
  interpolation to the next one underestimates a steep curve. Scores tied with a threshold count as missed.

This package also reports ``robustness = AUPRO(Q1) / AUPRO(Q4)`` at FPR 0.30. That single figure is this
package's own summary of the table (1 means the tiniest defects are found as well as defects overall); it
is not a figure reported in the paper.
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from anomalib.metrics import AnomalibMetric
from scipy import ndimage
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

FPR_LIMITS: tuple[float, ...] = (0.30, 0.10, 0.05, 0.01)
"""FPR limits of the table columns."""

SIZE_PERCENTILES: tuple[float, ...] = (25.0, 50.0, 75.0)
"""Percentiles of the region areas that bound the subsets ``Q1``, ``Q2`` and ``Q3``."""

SUBSETS: tuple[str, ...] = ("Q1", "Q2", "Q3", "Q4")
"""Names of the table rows."""

ROBUSTNESS_KEY = "robustness"
"""Key of ``AUPRO(Q1) / AUPRO(Q4)`` at FPR 0.30 in :func:`table_to_dict`."""

TABLE_KEYS: tuple[str, ...] = tuple(f"{q}_fpr{limit:.2f}" for q in SUBSETS for limit in FPR_LIMITS)
"""Keys of the table entries in :func:`table_to_dict`, row by row (``"Q1_fpr0.30"``, ...)."""

Curve = Literal["exact", "authors"]
"""PRO curves: ``"exact"`` (anomalib's AUPRO) or ``"authors"`` (the paper's tables); see the module docstring."""

CURVES: tuple[str, ...] = get_args(Curve)
"""Names of the PRO curves, the default first."""

AUTHORS_NUM_THRESHOLDS = 99
"""Thresholds of the authors' curve (``num_thresholds`` of their ``calculate_au_pro``)."""

_EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def table_to_dict(table: torch.Tensor) -> dict[str, torch.Tensor]:
    """Name the entries of a size-AUPRO table and add the robustness figure.

    Args:
        table: ``(4, 4)`` tensor, rows ``Q1..Q4``, columns FPR limits ``0.30, 0.10, 0.05, 0.01``.

    Returns:
        Scalar tensors keyed ``"Q1_fpr0.30"`` ... ``"Q4_fpr0.01"``, plus ``"robustness"``, the ratio
        ``AUPRO(Q1) / AUPRO(Q4)`` at FPR 0.30 (NaN when ``AUPRO(Q4)`` is 0 or undefined).
    """
    if table.shape != (len(SUBSETS), len(FPR_LIMITS)):
        msg = f"Expected a table of shape ({len(SUBSETS)}, {len(FPR_LIMITS)}), got {tuple(table.shape)}."
        raise ValueError(msg)
    values = dict(zip(TABLE_KEYS, table.reshape(-1).unbind(), strict=True))
    q1, q4 = table[0, 0], table[-1, 0]
    values[ROBUSTNESS_KEY] = q1 / q4 if q4 > 0 else torch.full_like(q4, float("nan"))
    return values


def size_aupro_table(preds: torch.Tensor, target: torch.Tensor, curve: Curve = "exact") -> torch.Tensor:
    """Compute the size-stratified AUPRO table of a set of anomaly maps in one call.

    Args:
        preds: Anomaly maps, ``(B, H, W)``, ``(B, 1, H, W)`` or ``(H, W)``; higher means more anomalous.
        target: Ground-truth masks of the same spatial shape, values in ``[0, 1]``.
        curve: PRO curve, ``"exact"`` (anomalib's AUPRO) or ``"authors"`` (the paper's tables).

    Returns:
        ``(4, 4)`` float32 tensor, rows ``Q1..Q4``, columns FPR limits ``0.30, 0.10, 0.05, 0.01``.
    """
    metric = _SizeAUPRO(curve=curve)
    metric.update(preds, target)
    return metric.compute()


def _as_bhw(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``tensor`` as a plain ``(B, H, W)`` tensor (drops tv_tensor subclasses and a channel dim)."""
    tensor = torch.as_tensor(tensor).as_subclass(torch.Tensor)
    if tensor.ndim == 2:
        return tensor.unsqueeze(0)
    if tensor.ndim == 3:
        return tensor
    if tensor.ndim == 4 and tensor.shape[1] == 1:
        return tensor.squeeze(1)
    msg = f"`{name}` must have shape (H, W), (B, H, W) or (B, 1, H, W), got {tuple(tensor.shape)}."
    raise ValueError(msg)


def _nan_table(reason: str) -> np.ndarray:
    rank_zero_warn(f"SizeAUPRO is undefined ({reason}); returning NaN.", UserWarning)
    return np.full((len(SUBSETS), len(FPR_LIMITS)), np.nan)


def _area_to_limits(fpr: np.ndarray, pro: np.ndarray, limits: Sequence[float]) -> list[float]:
    """Normalised trapezoid area under ``pro(fpr)`` from 0 to each limit (as in anomalib's AUPRO).

    ``fpr`` is non-decreasing, starts at 0 and ends at 1; the point at the limit is interpolated linearly
    between the last curve point at or below the limit and the next one.
    """
    cumulative = np.concatenate(([0.0], np.cumsum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2)))
    areas = []
    for limit in limits:
        i = int(np.searchsorted(fpr, limit, side="right")) - 1
        area = cumulative[i]
        if fpr[i] < limit and i + 1 < fpr.size:
            pro_at_limit = pro[i] + (pro[i + 1] - pro[i]) * (limit - fpr[i]) / (fpr[i + 1] - fpr[i])
            area += (limit - fpr[i]) * (pro[i] + pro_at_limit) / 2
        areas.append(area / limit)
    return areas


def _gather(images: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``(scores, mask)`` pairs of 2-D arrays into the pixels the PRO curve needs.

    Returns:
        The sorted anomaly-free scores, and the scores of the anomalous pixels with their 0-based region ids
        (8-connected regions, numbered over all images).
    """
    num_background = sum(mask.size - int(np.count_nonzero(mask)) for _, mask in images)
    background = np.empty(num_background, dtype=np.float32)
    fg_scores, fg_regions = [np.empty(0, dtype=np.float32)], [np.empty(0, dtype=np.int64)]
    offset = start = 0
    for scores, mask in images:
        if scores.shape != mask.shape:
            msg = f"Anomaly map of shape {scores.shape} does not match mask of shape {mask.shape}."
            raise ValueError(msg)
        stop = start + mask.size - int(np.count_nonzero(mask))
        background[start:stop] = scores[~mask]
        start = stop
        if not mask.any():
            continue
        labels, num_labels = ndimage.label(mask, structure=_EIGHT_CONNECTIVITY)
        fg_scores.append(scores[mask])
        fg_regions.append(labels[mask] + (offset - 1))  # 0-based region ids, unique over all images
        offset += num_labels

    background.sort()  # NaN sorts last
    scores = np.concatenate(fg_scores)
    if (num_background and np.isnan(background[-1])) or np.isnan(scores).any():
        msg = "Anomaly maps contain NaN."
        raise ValueError(msg)
    return background, scores, np.concatenate(fg_regions)


def _exact_curve(background: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anomalib's PRO curve: FPR per point, and the index of the first sorted anomalous pixel it counts.

    Args:
        background: Sorted anomaly-free scores.
        scores: Sorted anomalous scores.
    """
    # runs of equal anomalous scores: one threshold each, [starts, ends) in the sorted arrays
    starts = np.flatnonzero(np.concatenate(([True], scores[1:] != scores[:-1])))
    ends = np.append(starts[1:], scores.size)
    thresholds = scores[starts]
    num_background = background.size
    fpr_at_or_above = (num_background - np.searchsorted(background, thresholds, side="left")) / num_background
    fpr_above = (num_background - np.searchsorted(background, thresholds, side="right")) / num_background
    # descending thresholds; per threshold the curve goes from the state just above it to the state at it
    fpr = np.concatenate(([0.0], np.stack((fpr_above, fpr_at_or_above), axis=1)[::-1].ravel(), [1.0]))
    first = np.concatenate(([scores.size], np.stack((ends, starts), axis=1)[::-1].ravel(), [0]))
    return fpr, first


def _authors_curve(background: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The authors' sampled PRO curve, in the form of :func:`_exact_curve` (see the module docstring)."""
    num_background = background.size
    # ascending FPR: the highest threshold first
    positions = np.linspace(0, num_background - 1, num=AUTHORS_NUM_THRESHOLDS).astype(np.int64)[::-1]
    fpr = np.append(1.0 - (positions + 1) / num_background, 1.0)
    first = np.append(np.searchsorted(scores, background[positions], side="right"), 0)
    return fpr, first


_CURVE_BUILDERS: dict[str, Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "exact": _exact_curve,
    "authors": _authors_curve,
}


def _size_aupro_table(images: Sequence[tuple[np.ndarray, np.ndarray]], curve: Curve) -> np.ndarray:
    """Size-stratified AUPRO table (float64, ``(4, 4)``) of ``(scores, mask)`` pairs of 2-D arrays."""
    background, scores, regions = _gather(images)
    if regions.size == 0:
        return _nan_table("no anomalous region in the ground truth")
    if background.size == 0:
        return _nan_table("no anomaly-free pixel in the ground truth")

    areas = np.bincount(regions)
    # number of percentiles strictly below the area: the region is in subset s (0-based) iff this is <= s
    size_class = np.searchsorted(np.percentile(areas, SIZE_PERCENTILES), areas, side="left")

    order = np.argsort(scores)
    scores = scores[order]
    regions = regions[order]
    fpr, first = _CURVE_BUILDERS[curve](background, scores)

    region_class = size_class[regions]
    inverse_area = 1.0 / areas[regions]
    table = np.empty((len(SUBSETS), len(FPR_LIMITS)))
    for subset in range(len(SUBSETS)):
        in_subset = region_class <= subset
        weights = np.where(in_subset, inverse_area, 0.0) / np.count_nonzero(size_class <= subset)
        # pro_from[i]: mean overlap of the subset's regions counting the sorted pixels i, i+1, ...
        pro_from = np.append(np.cumsum(weights[::-1])[::-1], 0.0)
        table[subset] = _area_to_limits(fpr, pro_from[first], FPR_LIMITS)
    return table


class _SizeAUPRO(Metric):
    """AUPRO of size-stratified ground-truth regions (torchmetrics metric).

    ``compute()`` returns a ``(4, 4)`` tensor: rows ``Q1..Q4`` (regions with area up to the 25th, 50th,
    75th percentile of all region areas, and all regions), columns FPR limits ``0.30, 0.10, 0.05, 0.01``.

    Anomaly maps are stored as float32 and masks as uint8 until ``compute()``. Masks must hold values in
    ``[0, 1]``; pixels above 0.5 are anomalous. ``curve`` selects the PRO curve: ``"exact"`` (anomalib's
    AUPRO) or ``"authors"`` (the paper's tables; see the module docstring).

    Degenerate inputs:
        * no anomalous region, no anomaly-free pixel, or no update at all: the table is all NaN, with a
          warning (AUPRO is undefined);
        * all regions of the same size (including a single region): every subset holds all regions, so
          all rows are equal and the robustness is 1;
        * NaN in the anomaly maps, maps and masks of different shapes, or mask values outside ``[0, 1]``:
          ``ValueError``.
    """

    is_differentiable: bool = False
    higher_is_better: bool | None = True
    full_state_update: bool = False
    preds: list[torch.Tensor]
    target: list[torch.Tensor]

    def __init__(self, curve: Curve = "exact", **kwargs: Any) -> None:
        if curve not in CURVES:
            msg = f"`curve` must be one of {CURVES}, got {curve!r}."
            raise ValueError(msg)
        super().__init__(**kwargs)
        self.curve = curve
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self._table_cache: torch.Tensor | None = None
        # kept across reset(): Lightning resets logged metrics right after the epoch-end log
        self.last_table: torch.Tensor | None = None

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Store a batch of anomaly maps and ground-truth masks.

        Args:
            preds: Anomaly maps, ``(B, H, W)``, ``(B, 1, H, W)`` or ``(H, W)``.
            target: Ground-truth masks of the same spatial shape, values in ``[0, 1]`` (bool or numeric).
        """
        preds = _as_bhw(preds, "preds")
        target = _as_bhw(target, "target")
        if preds.shape != target.shape:
            msg = f"Anomaly maps of shape {tuple(preds.shape)} do not match masks of {tuple(target.shape)}."
            raise ValueError(msg)
        if target.dtype != torch.bool:
            if target.numel() and (target.min() < 0 or target.max() > 1):
                msg = f"Mask values must lie in [0, 1], found [{target.min()}, {target.max()}]."
                raise ValueError(msg)
            target = target > 0.5
        self.preds.append(preds.detach().to(torch.float32))
        self.target.append(target.to(torch.uint8))

    def _compute_table(self) -> torch.Tensor:
        preds = self.preds if isinstance(self.preds, list) else [self.preds]
        target = self.target if isinstance(self.target, list) else [self.target]
        images = []
        for batch_preds, batch_target in zip(preds, target, strict=True):
            batch_scores = batch_preds.cpu().numpy()
            batch_masks = batch_target.cpu().numpy().view(np.bool_)
            images.extend(zip(batch_scores, batch_masks, strict=True))
        table = _size_aupro_table(images, self.curve) if images else _nan_table("no data")
        self._table_cache = torch.from_numpy(table).to(dtype=torch.float32, device=self.device)
        self.last_table = self._table_cache
        return self._table_cache.clone()

    def compute(self) -> torch.Tensor:
        """Compute the ``(4, 4)`` table (rows ``Q1..Q4``, columns FPR limits ``0.30, 0.10, 0.05, 0.01``)."""
        return self._compute_table()

    def table(self) -> torch.Tensor:
        """Return the ``(4, 4)`` table for the current state, reusing the last computation if still valid.

        Returns:
            ``(4, 4)`` tensor, rows ``Q1..Q4``, columns FPR limits ``0.30, 0.10, 0.05, 0.01``.
        """
        # torchmetrics clears ``_computed`` whenever the state changes (update, reset, forward)
        if self._table_cache is not None and self._computed is not None:
            return self._table_cache.clone()
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            return self._compute_table()

    def compute_dict(self) -> dict[str, torch.Tensor]:
        """Return the table entries as named scalars plus ``"robustness"`` (see :func:`table_to_dict`)."""
        return table_to_dict(self.table())

    def robustness(self) -> torch.Tensor:
        """Return ``AUPRO(Q1) / AUPRO(Q4)`` at FPR 0.30 (this package's summary figure, not the paper's)."""
        return self.compute_dict()[ROBUSTNESS_KEY]


class SizeAUPRO(AnomalibMetric, _SizeAUPRO):  # type: ignore[misc]
    """Defect-size robustness of AUPRO as an anomalib metric, reading ``anomaly_map`` and ``gt_mask``.

    The torchmetrics state and algorithm are those of the size-stratified AUPRO table (see the module
    docstring). Because an anomalib ``Evaluator`` logs ``compute()`` through Lightning's ``self.log``,
    which only accepts a scalar tensor per metric, ``compute()`` returns one entry of the table, chosen with
    ``summary``; the whole table stays available through :meth:`table`, :meth:`compute_dict` and
    :attr:`last_table` (the latter survives the reset Lightning performs after logging).

    Args:
        fields: Batch fields holding the anomaly maps and the masks. Defaults to
            ``("anomaly_map", "gt_mask")``.
        prefix: Prefix of the logged name (``prefix + "SizeAUPRO"``).
        strict: Raise if a batch lacks a field (``True``) or skip it (``False``).
        summary: Value returned by ``compute()``: ``"robustness"`` (default; ``AUPRO(Q1) / AUPRO(Q4)`` at
            FPR 0.30, this package's summary figure, not the paper's) or a table entry such as
            ``"Q1_fpr0.30"`` or ``"Q4_fpr0.01"``.
        curve: PRO curve: ``"exact"`` (default; anomalib's AUPRO, one point per distinct score) or
            ``"authors"`` (the 99-threshold curve of the authors' code, which the paper's tables report).
        **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``dist_sync_on_step``).

    Degenerate inputs:
        * no anomalous region, no anomaly-free pixel, or no update at all: NaN table, with a warning;
        * all regions of the same size (including a single region): all rows equal, robustness 1;
        * NaN in the maps, maps and masks of different shapes, or mask values outside ``[0, 1]``:
          ``ValueError``.

    Example:
        >>> import torch
        >>> from anomalib.data import ImageBatch
        >>> from anomalib_transformer_student.metrics import SizeAUPRO
        >>> masks = torch.zeros(2, 32, 32, dtype=torch.bool)
        >>> masks[0, 2:4, 2:4] = True  # a 4-pixel defect
        >>> masks[1, 10:20, 10:20] = True  # a 100-pixel defect
        >>> maps = torch.zeros(2, 32, 32)
        >>> maps[1, 10:20, 10:20] = 1.0  # only the large defect is found
        >>> metric = SizeAUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_")
        >>> metric.update(ImageBatch(image=torch.rand(2, 3, 32, 32), anomaly_map=maps, gt_mask=masks))
        >>> metric.compute()  # robustness: 0.15 / 0.575
        tensor(0.2609)
        >>> metric.table()[:, 0]  # Q1..Q4 at FPR 0.30
        tensor([0.1500, 0.1500, 0.1500, 0.5750])

        The paper's tables use the authors' sampled curve:

        >>> metric = SizeAUPRO(curve="authors")
        >>> metric.update(ImageBatch(image=torch.rand(2, 3, 32, 32), anomaly_map=maps, gt_mask=masks))
        >>> metric.table()[:, 0]  # the small defect ties with the background: missed at every threshold
        tensor([0.0000, 0.0000, 0.0000, 0.5000])
    """

    default_fields: Sequence[str] = ("anomaly_map", "gt_mask")

    def __init__(
        self,
        fields: Sequence[str] | None = None,
        prefix: str = "",
        strict: bool = True,
        summary: str = ROBUSTNESS_KEY,
        curve: Curve = "exact",
        **kwargs: Any,
    ) -> None:
        if summary not in (*TABLE_KEYS, ROBUSTNESS_KEY):
            msg = f"`summary` must be {ROBUSTNESS_KEY!r} or one of {TABLE_KEYS}, got {summary!r}."
            raise ValueError(msg)
        super().__init__(fields=fields, prefix=prefix, strict=strict, curve=curve, **kwargs)
        self.summary = summary

    def compute(self) -> torch.Tensor | None:
        """Return the ``summary`` entry (scalar), or ``None`` if non-strict and never updated."""
        table = super().compute()
        if table is None:
            return None
        return table_to_dict(table)[self.summary]
