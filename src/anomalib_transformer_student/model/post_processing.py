"""Thresholds from good images: a quantile of the good validation images' scores, for images and for pixels.

anomalib's default :class:`~anomalib.post_processing.PostProcessor` picks the threshold that maximises
F1 on the validation set. When that set holds only good images, as MVTec AD 2's ``validation/good``
does, there is no F1 to maximise, and anomalib falls back to the highest validation score (image) and
the highest validation pixel (maps): a single outlier among thousands of good images, or one bright
pixel among millions, sets it.

:class:`QuantilePostProcessor` sets each threshold from the good validation images alone, at a quantile
``q`` of their distribution: ``image_quantile`` over the images' scores, ``pixel_quantile`` over all their
pixels. ``q`` is one minus the false-positive rate it allows on good images: at most a fraction ``1 - q``
of the good validation images (pixels) lie above the threshold, and ``q = 1`` is anomalib's fallback, the
maximum. The thresholds go where anomalib keeps its own (the post-processor's ``_image_threshold`` and
``_pixel_threshold`` buffers), so normalised scores, labels, masks, checkpoints and exported graphs all use
them; normalisation (validation min and max) is anomalib's.

How each quantile is computed:

- image scores: exactly, from all good validation scores (numpy's ``inverted_cdf`` quantile: the
  smallest score that at least a fraction ``q`` of them do not exceed);
- pixels: from a histogram of every pixel of every good validation image, with ``2**20`` bins laid on the
  float32 bit pattern (bins a relative ``2**-11``, about 0.05 %, of the value wide, for any range, sign or
  scale), so memory stays at 8 MiB whatever the number and size of the images; the threshold is the upper
  edge of the bin where the quantile falls (capped at the largest pixel), so at most a fraction ``1 - q``
  of the good validation pixels exceed it. Exact counts, no sampling: the same maps give the same threshold.

Validation images count as good when their label is 0, or when the batch has no labels; anomalous
validation images (MVTec AD's ``same_as_test`` split) are left out of the quantiles.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from anomalib.post_processing import PostProcessor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

if TYPE_CHECKING:
    from anomalib.data import Batch
    from lightning import LightningModule, Trainer

logger = logging.getLogger(__name__)

HISTOGRAM_BITS = 20
"""Bins of the pixel histogram: ``2**20``, the top 20 bits of a float32 (sign, exponent, 11 mantissa bits)."""
_DROPPED_BITS = 32 - HISTOGRAM_BITS
_OFFSET = 1 << (HISTOGRAM_BITS - 1)
_LOW_BITS = (1 << _DROPPED_BITS) - 1


def _check_quantile(name: str, value: float | None) -> float | None:
    """``value`` if it is ``None`` or a number in (0, 1], else a ``ValueError`` naming the setting."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        msg = (
            f"{name} must be a quantile in (0, 1] (one minus the false-positive rate allowed on good images), or "
            f"None for anomalib's F1-adaptive threshold; got {value!r}. E.g. {name}=0.99."
        )
        raise ValueError(msg)
    return float(value)


def _ordered_bins(values: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each float32 value: its bit pattern, made order-preserving, top ``HISTOGRAM_BITS`` bits."""
    bits = (values.to(torch.float32) + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their magnitude order
    return (ordered >> _DROPPED_BITS).to(torch.int64) + _OFFSET


def _bin_upper_edge(index: int) -> float:
    """The largest float32 in histogram bin ``index``."""
    ordered = torch.tensor([((index - _OFFSET) << _DROPPED_BITS) | _LOW_BITS], dtype=torch.int64).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return float(bits.view(torch.float32))


class GoodScores(Metric):
    """Image scores of good images, kept exactly; their quantiles.

    Example:
        >>> scores = GoodScores()
        >>> scores.update(torch.tensor([0.1, 0.9, 0.4, 0.2]), torch.tensor([0, 1, 0, 0]))
        >>> round(float(scores.quantile(1.0)), 6), round(float(scores.quantile(0.5)), 6)
        (0.4, 0.2)
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.scores: list[torch.Tensor]

    def update(self, scores: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add the scores of the good images (label 0, or all when ``labels`` is ``None``)."""
        scores = scores.detach().reshape(len(scores), -1)[:, 0].to(torch.float32)
        self.scores.append(scores if labels is None else scores[labels.reshape(-1) == 0])

    def count(self) -> int:
        """Good scores collected (on this process)."""
        return sum(len(scores) for scores in self.scores)

    def compute(self) -> torch.Tensor:
        """All good scores, sorted."""
        return torch.sort(dim_zero_cat(self.scores)).values

    def quantile(self, q: float) -> torch.Tensor | None:
        """The smallest score that at least a fraction ``q`` of the good scores do not exceed (``None`` if none)."""
        ordered = self.compute()
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if len(ordered) else None


class GoodPixelHistogram(Metric):
    """Every pixel of the good images' anomaly maps in a fixed-size histogram on the float32 bit pattern.

    Example:
        >>> histogram = GoodPixelHistogram()
        >>> maps = torch.arange(200.0).reshape(2, 10, 10)  # image 0: 0..99, image 1: 100..199
        >>> histogram.update(maps, torch.tensor([0, 1]))
        >>> float(histogram.quantile(1.0)), round(float(histogram.quantile(0.9)), 4)  # 89 and its bin's upper edge
        (99.0, 89.0312)
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", default=torch.zeros(1 << HISTOGRAM_BITS, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("maximum", default=torch.tensor(-math.inf), dist_reduce_fx="max")
        self.counts: torch.Tensor
        self.maximum: torch.Tensor

    def update(self, maps: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Count the finite pixels of the good images' maps (label 0, or all when ``labels`` is ``None``)."""
        maps = maps.detach().reshape(len(maps), -1)
        if labels is not None:
            maps = maps[labels.reshape(-1) == 0]
        values = maps[torch.isfinite(maps)]
        if values.numel():
            self.counts += torch.bincount(_ordered_bins(values), minlength=len(self.counts))
            self.maximum = torch.maximum(self.maximum, values.max().to(self.maximum))

    def count(self) -> int:
        """Good pixels counted (on this process)."""
        return int(self.counts.sum())

    def compute(self) -> torch.Tensor:
        """The bin counts."""
        return self.counts

    def quantile(self, q: float) -> torch.Tensor | None:
        """The upper edge of the bin holding the ``q`` quantile, at most the largest pixel (``None`` if none)."""
        cumulative = torch.cumsum(self.compute(), 0)
        if int(cumulative[-1]) == 0:
            return None
        needed = max(1, math.ceil(q * int(cumulative[-1])))
        index = int(torch.searchsorted(cumulative, torch.tensor([needed], device=cumulative.device)))
        edge = torch.tensor(_bin_upper_edge(index), device=self.maximum.device)
        return torch.minimum(edge, self.maximum)


class QuantilePostProcessor(PostProcessor):
    r"""anomalib's post-processor with thresholds at a quantile of the good validation images' scores.

    Each threshold is set after every validation from the good validation images alone: the image
    threshold at the ``image_quantile`` of their scores, the pixel threshold at the ``pixel_quantile``
    of all their pixels (see the module's notes on how). ``q`` is one minus the false-positive rate on
    good images: ``0.99`` flags at most 1 % of the good validation images. Everything else (min-max
    normalisation, sensitivity, labels and masks at normalised 0.5, the buffers that checkpoints and
    exports carry) is anomalib's :class:`~anomalib.post_processing.PostProcessor`.

    Args:
        image_quantile: Quantile of the good validation images' scores for the image threshold, in
            (0, 1]; ``None`` keeps anomalib's F1-adaptive threshold (the maximum, without defects).
        pixel_quantile: Quantile of the good validation images' pixels for the pixel threshold, in
            (0, 1]; ``None`` keeps anomalib's F1-adaptive threshold.
        **kwargs: Passed to :class:`~anomalib.post_processing.PostProcessor` (``enable_normalization``,
            ``image_sensitivity``, ...).

    Raises:
        ValueError: If a quantile is outside (0, 1]; the message names valid values.

    Example:
        >>> from anomalib_transformer_student import TransformerStudent
        >>> post_processor = QuantilePostProcessor(image_quantile=0.99, pixel_quantile=0.9999)
        >>> model = TransformerStudent(pretrained=False, image_size=56, post_processor=post_processor)
        >>> type(model.post_processor).__name__
        'QuantilePostProcessor'

        From the anomalib CLI::

            anomalib train --model TransformerStudent \
              --model.post_processor anomalib_transformer_student.model.post_processing.QuantilePostProcessor \
              --model.post_processor.init_args.image_quantile 0.99 \
              --model.post_processor.init_args.pixel_quantile 0.9999 ...
    """

    def __init__(
        self, image_quantile: float | None = 0.99, pixel_quantile: float | None = 0.9999, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.image_quantile = _check_quantile("image_quantile", image_quantile)
        self.pixel_quantile = _check_quantile("pixel_quantile", pixel_quantile)
        self._good_image_scores = GoodScores()
        self._good_pixels = GoodPixelHistogram()

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        """The keys anomalib persists, and the two quantiles."""
        return (*super()._checkpoint_config_keys, "image_quantile", "pixel_quantile")

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start each validation with empty quantile statistics."""
        del trainer, pl_module
        self._good_image_scores.reset()
        self._good_pixels.reset()

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any, **kwargs: Any
    ) -> None:
        """Collect the good images' scores and pixels (and anomalib's statistics for what they do not set)."""
        del trainer, pl_module, args, kwargs
        if self.enable_thresholding:
            labels = getattr(outputs, "gt_label", None)
            if self.image_quantile is None:
                self._image_threshold_metric.update(outputs)
            elif outputs.pred_score is not None:
                self._good_image_scores.update(outputs.pred_score, labels)
            if self.pixel_quantile is None:
                self._pixel_threshold_metric.update(outputs)
            elif outputs.anomaly_map is not None:
                self._good_pixels.update(outputs.anomaly_map, labels)
        if self.enable_normalization:
            self._image_min_max_metric.update(outputs)
            self._pixel_min_max_metric.update(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set min and max (and any F1-adaptive threshold) as anomalib does, then the quantile thresholds."""
        super().on_validation_epoch_end(trainer, pl_module)
        if not self.enable_thresholding:
            return
        if self.image_quantile is not None:
            self._set_threshold("image", self._good_image_scores, self.image_quantile, self._image_threshold)
        if self.pixel_quantile is not None:
            self._set_threshold("pixel", self._good_pixels, self.pixel_quantile, self._pixel_threshold)

    @staticmethod
    def _set_threshold(
        level: str, statistics: GoodScores | GoodPixelHistogram, q: float, threshold: torch.Tensor
    ) -> None:
        """Copy the ``q`` quantile of ``statistics`` into ``threshold``, or warn (keeping it) when nothing was good."""
        if not statistics.update_called:
            return
        value = statistics.quantile(q)
        statistics.reset()
        if value is None:
            logger.warning(
                "The validation set has no good image, so the %s threshold at quantile %s cannot be set and keeps "
                "its value (%s): validate on good images (MVTec AD 2's validation/good), or set %s_quantile=None "
                "for anomalib's F1-adaptive threshold.",
                level,
                q,
                float(threshold),
                level,
            )
            return
        threshold.copy_(value)


__all__ = ["GoodPixelHistogram", "GoodScores", "QuantilePostProcessor"]
