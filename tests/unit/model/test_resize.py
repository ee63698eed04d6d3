"""Pad-and-resize as matrix products equals anomalib's SquarePad + PyTorch's antialiased bicubic, in every path.

Also: the top-k count of a graph for any size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib.data.transforms import SquarePad
from anomalib.pre_processing.utils.spec import spec_to_transform, transform_to_spec
from torch.export import Dim, export
from torch.nn import functional
from torchvision import tv_tensors

from anomalib_transformer_student.model.anomaly_map import top_k_count, top_k_mean
from anomalib_transformer_student.model.pre_processing import (
    OriginalSizePreProcessor,
    square_resize_transform,
)
from anomalib_transformer_student.model.resize import SquareResize, square_resize


def reference(images: torch.Tensor, size: int) -> torch.Tensor:
    padded = SquarePad()(images)
    return functional.interpolate(padded, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [(300, 200, 112), (200, 300, 112), (448, 448, 112), (57, 33, 56), (100, 150, 224), (1, 1, 56), (700, 3, 56)],
    ids=["tall-shrink", "wide-shrink", "4x-shrink", "off-grid", "enlarge", "one-pixel", "thin-strip"],
)
def test_square_resize_equals_square_pad_and_antialiased_bicubic(height: int, width: int, size: int) -> None:
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height + width))
    torch.testing.assert_close(square_resize(images, size), reference(images, size), atol=2e-6, rtol=0)


def test_masks_are_zero_padded_and_resized_by_nearest_neighbour() -> None:
    mask = tv_tensors.Mask(torch.zeros(1, 40, 20, dtype=torch.bool))
    mask[..., 10:12, 5:7] = True
    resized = SquareResize(80)(mask)
    assert isinstance(resized, tv_tensors.Mask) and resized.dtype == torch.bool
    assert resized.shape == (1, 80, 80)
    assert int(resized.sum()) == 16  # a 2 x 2 spot doubled in each direction, nothing added by the padding
    assert not resized[..., :, :20].any() and not resized[..., :, 60:].any()  # the zero padding left and right


def test_transform_spec_round_trips_through_anomalibs_registry() -> None:
    transform = square_resize_transform(112)
    rebuilt = spec_to_transform(transform_to_spec(transform))
    images = torch.rand(1, 3, 90, 130)
    torch.testing.assert_close(rebuilt(images), transform(images))


def test_the_export_transform_keeps_antialiasing() -> None:
    """anomalib's get_exportable_transform turns a Resize's antialiasing off; SquareResize keeps it."""
    pre_processor = OriginalSizePreProcessor(square_resize_transform(56))
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pre_processor.export_transform(images), pre_processor.transform(images))
    unaliased = functional.interpolate(SquarePad()(images), size=(56, 56), mode="bicubic", antialias=False)
    normalised = pre_processor.transform.transforms[0](unaliased)
    assert (normalised - pre_processor.transform(images)).abs().max() > 0.1


def test_one_traced_graph_resizes_every_size_as_the_eager_code() -> None:
    class Resize(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return square_resize(images, 56)

    dynamic = ({2: Dim("height", min=2), 3: Dim("width", min=2)},)
    program = export(Resize(), (torch.rand(1, 3, 64, 64),), dynamic_shapes=dynamic, strict=False)
    for height, width in [(64, 64), (224, 100), (31, 57), (56, 56)]:
        images = torch.rand(1, 3, height, width)
        torch.testing.assert_close(program.module()(images), reference(images, 56), atol=2e-6, rtol=0)


def test_the_traced_top_k_count_is_the_references_for_the_default_ratio() -> None:
    # The reference's count, int(H * W * 0.001) in floating point, equals the integer H * W // 1000 that a
    # graph for any size computes, for every pixel count up to 20 million.
    pixels = np.arange(1, 20_000_001, dtype=np.int64)
    assert np.array_equal((pixels.astype(np.float64) * 0.001).astype(np.int64), pixels // 1000)

    class Score(torch.nn.Module):
        def forward(self, maps: torch.Tensor) -> torch.Tensor:
            return top_k_mean(maps, 0.001)

    dynamic = ({2: Dim("height", min=2), 3: Dim("width", min=2)},)
    program = export(Score(), (torch.rand(1, 1, 64, 64),), dynamic_shapes=dynamic, strict=False)
    # (The traced program guards k >= 2, as its example had; ONNX and OpenVINO graphs hold no guards.)
    for height, width in [(50, 60), (1036, 1036), (683, 1024), (1000, 1001)]:
        maps = torch.rand(1, 1, height, width)
        assert top_k_count(height, width, 0.001) == max(1, int(height * width * 0.001))
        torch.testing.assert_close(program.module()(maps), top_k_mean(maps, 0.001))
