"""``SizeEvaluator``: anomalib's test metrics plus the defect-size AUPRO, built in one place.

The demo, ``transformer-student evaluate`` and ``configs/size_aupro.yaml`` all test with this evaluator, each
with its own options, so that the metric set of each is defined here and nowhere else.
"""

from collections.abc import Mapping, Sequence

from anomalib.metrics import AUPRO, AUROC, AnomalibMetric, Evaluator, F1Score

from .size_aupro import ROBUSTNESS_KEY, Curve, SizeAUPRO

IMAGE_FIELDS = ("pred_score", "gt_label")
PIXEL_FIELDS = ("anomaly_map", "gt_mask")
DEFAULT_SUMMARIES: Mapping[str, str] = {"pixel_": ROBUSTNESS_KEY}
"""SizeAUPRO metrics of :class:`SizeEvaluator` by default: ``pixel_SizeAUPRO`` logging the robustness."""


class SizeEvaluator(Evaluator):
    """Evaluator with image and pixel AUROC, AUPRO, optionally F1 scores, and one ``SizeAUPRO`` per summary.

    The test metrics, in order: ``image_AUROC``, ``image_F1Score`` (with ``include_f1``), ``pixel_AUROC``,
    ``pixel_AUPRO`` (FPR limit 0.3), ``pixel_F1Score`` (with ``include_f1``), then a :class:`SizeAUPRO` per
    entry of ``summaries``. Every ``SizeAUPRO`` computes the same table; each logs one entry of it.

    Args:
        summaries: The ``SizeAUPRO`` metrics, as logged-name prefix to the table entry the metric logs
            (its ``summary``): ``{"pixel_q1_": "Q1_fpr0.30"}`` logs ``pixel_q1_SizeAUPRO``. Defaults to
            ``{"pixel_": "robustness"}``; ``{}`` adds none.
        curve: PRO curve of the ``SizeAUPRO`` metrics: ``"exact"`` (anomalib's AUPRO) or ``"authors"`` (the
            paper's tables). anomalib's ``AUPRO`` always uses the exact curve.
        include_f1: Add the image and pixel F1 scores, as anomalib's default evaluator has them.
        strict: Raise when a batch lacks a pixel field (``True``) or skip the pixel metrics for it (``False``,
            as anomalib's default evaluator does).
        compute_on_cpu: Passed to :class:`anomalib.metrics.Evaluator`.
        extra_metrics: Test metrics appended after these, e.g. MVTec AD 2's AU-PRO at FPR 0.05
            (:class:`~anomalib_transformer_student.metrics.binned_aupro.BinnedAUPRO`).

    Example:
        >>> from anomalib_transformer_student.metrics import SizeEvaluator
        >>> evaluator = SizeEvaluator(summaries={"pixel_": "robustness", "pixel_q1_": "Q1_fpr0.30"}, curve="authors")
        >>> [metric.name for metric in evaluator.test_metrics]
        ['image_AUROC', 'pixel_AUROC', 'pixel_AUPRO', 'pixel_SizeAUPRO', 'pixel_q1_SizeAUPRO']
        >>> evaluator.size_aupro().curve
        'authors'

        In a config (``configs/size_aupro.yaml``), as the model's evaluator:

        .. code-block:: yaml

            evaluator:
              class_path: anomalib_transformer_student.metrics.SizeEvaluator
              init_args: {curve: authors}
    """

    def __init__(
        self,
        summaries: Mapping[str, str] | None = None,
        curve: Curve = "exact",
        include_f1: bool = False,
        strict: bool = True,
        compute_on_cpu: bool = True,
        extra_metrics: Sequence[AnomalibMetric] = (),
    ) -> None:
        metrics = _test_metrics(DEFAULT_SUMMARIES if summaries is None else summaries, curve, include_f1, strict)
        metrics += list(extra_metrics)
        super().__init__(test_metrics=metrics, compute_on_cpu=compute_on_cpu)

    def size_aupro(self) -> SizeAUPRO | None:
        """Return the first ``SizeAUPRO`` test metric (its ``last_table`` is the whole table), if any."""
        return next((metric for metric in self.test_metrics if isinstance(metric, SizeAUPRO)), None)


def _test_metrics(summaries: Mapping[str, str], curve: Curve, include_f1: bool, strict: bool) -> list[AnomalibMetric]:
    image = [AUROC(fields=IMAGE_FIELDS, prefix="image_")]
    pixel = [
        AUROC(fields=PIXEL_FIELDS, prefix="pixel_", strict=strict),
        AUPRO(fields=PIXEL_FIELDS, prefix="pixel_", strict=strict),
    ]
    if include_f1:
        image.append(F1Score(fields=("pred_label", "gt_label"), prefix="image_"))
        pixel.append(F1Score(fields=("pred_mask", "gt_mask"), prefix="pixel_", strict=strict))
    sizes = [
        SizeAUPRO(fields=PIXEL_FIELDS, prefix=prefix, strict=strict, summary=summary, curve=curve)
        for prefix, summary in summaries.items()
    ]
    return [*image, *pixel, *sizes]
