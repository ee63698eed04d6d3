"""QuantilePostProcessor: thresholds at a quantile of the good validation images, from anomalib's validation hooks."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.post_processing import PostProcessor

from anomalib_transformer_student.model.post_processing import (
    HISTOGRAM_BITS,
    GoodPixelHistogram,
    GoodScores,
    QuantilePostProcessor,
    _bin_upper_edge,
    _ordered_bins,
)


def _validate(post_processor: PostProcessor, batches: list[SimpleNamespace]) -> None:
    """Run one validation epoch of ``post_processor``'s hooks over ``batches``, as Lightning calls them."""
    if hasattr(post_processor, "on_validation_epoch_start"):
        post_processor.on_validation_epoch_start(None, None)
    for batch in batches:
        post_processor.on_validation_batch_end(None, None, batch)
    post_processor.on_validation_epoch_end(None, None)


def _good_batches(generator: torch.Generator, images: int = 40, side: int = 32) -> list[SimpleNamespace]:
    """Good validation images: scores 1..images (one outlier of 100), maps of noise with one hot pixel of 50."""
    scores = torch.arange(1.0, images + 1)
    scores[-1] = 100.0
    maps = torch.rand(images, 1, side, side, generator=generator)
    maps[3, 0, 5, 5] = 50.0
    labels = torch.zeros(images, dtype=torch.long)
    masks = torch.zeros_like(maps, dtype=torch.bool)
    return [
        SimpleNamespace(
            pred_score=scores[i : i + 8],
            anomaly_map=maps[i : i + 8],
            gt_label=labels[i : i + 8],
            gt_mask=masks[i : i + 8],
        )
        for i in range(0, images, 8)
    ]


def test_bins_preserve_float_order_and_upper_edges_bound_them() -> None:
    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-8, 8, (20000,), generator=generator)
    extremes = torch.tensor([0.0, -0.0, 1e-30, -1e30, 3.4e38])
    values = torch.cat([torch.randn(20000, generator=generator) * scales, extremes])
    ordered = values.sort().values
    bins = _ordered_bins(ordered)
    assert bool((bins[1:] >= bins[:-1]).all())
    assert int(bins.min()) >= 0 and int(bins.max()) < 2**HISTOGRAM_BITS
    edges = torch.tensor([_bin_upper_edge(int(index)) for index in bins])
    assert bool((edges >= ordered).all())
    relative = ((edges - ordered).abs() / ordered.abs().clamp_min(1e-30))[ordered.abs() > 1e-30]
    assert float(relative.max()) <= 2.0**-11


@pytest.mark.parametrize("q", [0.5, 0.9, 0.999, 1.0])
def test_pixel_histogram_quantile_bounds_the_false_positive_rate(q: float) -> None:
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(6, 200, 300, generator=generator).exp()  # 360,000 pixels, log-normal
    histogram = GoodPixelHistogram()
    for start in range(0, 6, 2):
        histogram.update(maps[start : start + 2], torch.zeros(2))
    threshold = float(histogram.quantile(q))
    exact = float(np.quantile(maps.numpy(), q, method="inverted_cdf"))
    assert exact <= threshold <= exact * (1 + 2**-11)
    assert float((maps > threshold).float().mean()) <= 1 - q
    assert histogram.counts.numel() == 2**HISTOGRAM_BITS  # bounded memory, whatever was counted
    if q == 1.0:
        assert threshold == float(maps.max())  # anomalib's fallback, exactly


def test_only_good_images_count() -> None:
    scores, histogram = GoodScores(), GoodPixelHistogram()
    labels = torch.tensor([0, 1, 0])
    scores.update(torch.tensor([0.2, 9.0, 0.4]), labels)
    histogram.update(torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 9.0), torch.full((4, 4), 2.0)]), labels)
    assert float(scores.quantile(1.0)) == pytest.approx(0.4)
    assert float(histogram.quantile(1.0)) == 2.0
    assert histogram.count() == 32
    unlabelled = GoodScores()  # a batch without labels counts as good
    unlabelled.update(torch.tensor([0.2, 9.0]), None)
    assert float(unlabelled.quantile(1.0)) == 9.0


def test_quantile_thresholds_replace_anomalib_fallback() -> None:
    """anomalib's fallback: the outlier sets both thresholds; the quantiles of the good images do not follow it."""
    batches = _good_batches(torch.Generator().manual_seed(2))
    default = PostProcessor()
    _validate(default, batches)
    assert float(default.image_threshold) == 100.0 and float(default.pixel_threshold) == 50.0

    quantile = QuantilePostProcessor(image_quantile=0.9, pixel_quantile=0.99)
    _validate(quantile, batches)
    assert float(quantile.image_threshold) == 36.0  # the 36th of the 40 scores 1..39, 100
    maps = torch.cat([batch.anomaly_map for batch in batches]).numpy()
    exact = float(np.quantile(maps, 0.99, method="inverted_cdf"))
    assert exact <= float(quantile.pixel_threshold) <= exact * (1 + 2**-11)
    # Normalisation (validation min and max) is anomalib's, so both agree on it.
    for name in ("image_min", "image_max", "pixel_min", "pixel_max"):
        assert float(getattr(quantile, name)) == float(getattr(default, name))

    # Scores, labels and masks of the post-processed forward (the exported graph's) follow the thresholds.
    predictions = InferenceBatch(
        pred_score=torch.tensor([30.0, 37.0]),
        anomaly_map=torch.tensor([0.5, 0.999]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2),
    )
    outputs = quantile(predictions)
    assert outputs.pred_label.tolist() == [False, True]
    assert outputs.pred_mask.flatten(1).all(1).tolist() == [False, True]
    assert float(outputs.pred_score[1]) > 0.5 > float(outputs.pred_score[0])
    assert default(predictions).pred_label.tolist() == [False, False]


def test_anomalous_validation_images_are_left_out() -> None:
    batches = _good_batches(torch.Generator().manual_seed(3))
    bad = SimpleNamespace(
        pred_score=torch.tensor([1000.0]), anomaly_map=torch.full((1, 1, 32, 32), 1000.0), gt_label=torch.tensor([1])
    )
    with_bad, without = QuantilePostProcessor(0.9, 0.99), QuantilePostProcessor(0.9, 0.99)
    _validate(with_bad, [*batches, bad])
    _validate(without, batches)
    assert float(with_bad.image_threshold) == float(without.image_threshold)
    assert float(with_bad.pixel_threshold) == float(without.pixel_threshold)
    assert float(with_bad.image_max) == 1000.0  # normalisation still sees every image, as anomalib's does


def test_none_keeps_anomalib_threshold_for_that_level() -> None:
    batches = _good_batches(torch.Generator().manual_seed(4))
    image_only = QuantilePostProcessor(image_quantile=0.9, pixel_quantile=None)
    _validate(image_only, batches)
    assert float(image_only.image_threshold) == 36.0
    assert float(image_only.pixel_threshold) == 50.0


def test_every_validation_starts_afresh() -> None:
    post_processor = QuantilePostProcessor(image_quantile=1.0, pixel_quantile=1.0)
    _validate(post_processor, _good_batches(torch.Generator().manual_seed(5)))
    assert float(post_processor.image_threshold) == 100.0
    later = _good_batches(torch.Generator().manual_seed(5))
    for batch in later:
        batch.pred_score = batch.pred_score.clamp(max=20.0)
    post_processor.on_validation_batch_end(None, None, later[0])  # an interrupted epoch, then a full one
    _validate(post_processor, later)
    assert float(post_processor.image_threshold) == 20.0


def test_no_good_image_warns_and_keeps_the_threshold(caplog: pytest.LogCaptureFixture) -> None:
    post_processor = QuantilePostProcessor()
    bad = SimpleNamespace(
        pred_score=torch.tensor([3.0]), anomaly_map=torch.ones(1, 1, 4, 4), gt_label=torch.tensor([1])
    )
    with caplog.at_level(logging.WARNING):
        _validate(post_processor, [bad])
    assert "no good image" in caplog.text and "image_quantile=None" in caplog.text
    assert torch.isnan(post_processor._image_threshold)


def test_checkpoint_config_and_state_interchange_with_anomalib() -> None:
    post_processor = QuantilePostProcessor(image_quantile=0.95, pixel_quantile=0.999)
    _validate(post_processor, _good_batches(torch.Generator().manual_seed(6)))
    config = post_processor.checkpoint_config()
    assert config["image_quantile"] == 0.95 and config["pixel_quantile"] == 0.999
    restored = QuantilePostProcessor()
    restored.load_checkpoint_config(config)
    assert (restored.image_quantile, restored.pixel_quantile) == (0.95, 0.999)
    # The same buffers as anomalib's: a checkpoint loads into either, thresholds included.
    state = post_processor.state_dict()
    assert set(state) == set(PostProcessor().state_dict())
    default = PostProcessor()
    default.load_state_dict(state)
    assert float(default.image_threshold) == float(post_processor.image_threshold)
    assert float(default.pixel_threshold) == float(post_processor.pixel_threshold)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1, True, "0.9"])
def test_a_quantile_outside_0_1_names_the_fix(value: object) -> None:
    with pytest.raises(ValueError, match=r"image_quantile must be a quantile in \(0, 1\].*image_quantile=0.99"):
        QuantilePostProcessor(image_quantile=value)  # type: ignore[arg-type]
