"""Anomaly maps at each image's original size: geometry, parity with the reference, pipeline, export."""

from __future__ import annotations

import pytest
import torch
from anomalib.data.transforms import SquarePad
from anomalib.models.image.l2bt.anomaly_map import L2BTAnomalyMapGenerator
from torch.nn import functional

from anomalib_transformer_student.model.anomaly_map import AnomalyMapGenerator, square_padding
from anomalib_transformer_student.model.pre_processing import OriginalSizePreProcessor, square_resize_transform

from ...factories import small_model


def reference_map(patch_map: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """The reference evaluation: upsample to the padded square, eight conv2d box filters, crop the padding."""
    side, top, left = square_padding(original_size)
    anomaly_map = functional.interpolate(patch_map[:, None], size=(side, side), mode="bilinear", align_corners=False)
    for kernel_size, repeats in ((5, 5), (7, 3)):
        weight = torch.ones(1, 1, kernel_size, kernel_size) / kernel_size**2
        for _ in range(repeats):
            anomaly_map = functional.conv2d(anomaly_map, weight, padding=kernel_size // 2)
    return anomaly_map[..., top : top + original_size[0], left : left + original_size[1]]


@pytest.mark.parametrize("original_size", [(150, 100), (100, 151), (97, 97), (60, 203)])
def test_full_resolution_map_matches_the_reference_evaluation(original_size: tuple[int, int]) -> None:
    patch_map = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) * 4
    side = square_padding(original_size)[0]
    ours = AnomalyMapGenerator().smooth(patch_map, (side, side), original_size)
    assert ours.shape == (2, 1, *original_size)
    torch.testing.assert_close(ours, reference_map(patch_map, original_size), atol=1e-5, rtol=0)


def test_padding_sits_where_square_pad_puts_it() -> None:
    image = torch.zeros(1, 1, 5, 8)
    image[..., 2, 3] = 1.0
    padded = SquarePad()(image)
    side, top, left = square_padding((5, 8))
    assert padded.shape[-1] == side == 8
    assert padded[0, 0, top + 2, left + 3] == 1.0


def test_square_maps_keep_parity_with_anomalib_l2bt() -> None:
    generator = torch.Generator().manual_seed(3)
    tokens = [torch.randn(2, 16 * 16, 32, generator=generator) for _ in range(4)]
    ours, our_score = AnomalyMapGenerator()(*tokens, grid_size=(16, 16), output_size=(224, 224))
    theirs, their_score = L2BTAnomalyMapGenerator(patch_size=14)(*tokens, output_size=(224, 224))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_score, their_score, atol=1e-5, rtol=0)


def test_pre_processor_keeps_evaluation_batches_at_original_size() -> None:
    transform = square_resize_transform(56)

    class FakeBatch:
        image = torch.rand(1, 3, 90, 60)
        gt_mask = torch.zeros(1, 90, 60, dtype=torch.bool)

    kept = FakeBatch()
    OriginalSizePreProcessor(transform).on_test_batch_start(None, None, kept, 0)
    assert kept.image.shape[-2:] == kept.gt_mask.shape[-2:] == (90, 60)

    resized = FakeBatch()
    OriginalSizePreProcessor(transform, keep_original_size=False).on_test_batch_start(None, None, resized, 0)
    assert resized.image.shape[-2:] == (56, 56)

    trained = FakeBatch()
    OriginalSizePreProcessor(transform).on_train_batch_start(None, None, trained, 0)
    assert trained.image.shape[-2:] == (56, 56)


def test_exported_model_returns_the_map_at_the_input_size() -> None:
    model = small_model().eval()
    image = torch.rand(1, 3, 150, 100)
    exported = torch.export.export(model, (image,)).module()
    with torch.no_grad():
        expected = model(image)
        actual = exported(image)
    assert actual.anomaly_map.shape == (1, 1, 150, 100)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)
