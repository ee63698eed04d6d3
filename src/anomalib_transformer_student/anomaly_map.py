"""From teacher/student discrepancy to an anomaly map and an image score.

Pure tensor maths with static shapes, so that it exports to ONNX/OpenVINO unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional


def patch_discrepancy(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L2 distance between L2-normalised prediction and target tokens.

    Args:
        prediction: Student output, shape ``(B, N, D)``.
        target: Teacher tokens, shape ``(B, N, D)``.

    Returns:
        Distances of shape ``(B, N)``, in ``[0, 2]``.
    """
    difference = functional.normalize(prediction, dim=-1) - functional.normalize(target, dim=-1)
    return difference.pow(2).sum(-1).sqrt()


def box_blur(anomaly_map: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """One pass of a ``kernel_size`` x ``kernel_size`` mean filter with zero padding.

    Equal to a convolution with ``ones(k, k) / k**2`` and padding ``k // 2``, computed as two
    1-D average pools (zeros counted in the mean), which costs ``2k`` instead of ``k**2``
    operations per pixel.
    """
    pad = kernel_size // 2
    anomaly_map = functional.avg_pool2d(anomaly_map, (1, kernel_size), stride=1, padding=(0, pad))
    return functional.avg_pool2d(anomaly_map, (kernel_size, 1), stride=1, padding=(pad, 0))


def top_k_mean(anomaly_map: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean of the highest ``max(1, int(ratio * H * W))`` values of each map.

    Args:
        anomaly_map: Maps of shape ``(B, 1, H, W)``.
        ratio: Fraction of pixels that make the score, in ``(0, 1]``.

    Returns:
        Scores of shape ``(B,)``.
    """
    height, width = anomaly_map.shape[-2:]
    k = max(1, int(ratio * height * width))
    return torch.topk(anomaly_map.flatten(1), k=k, dim=1).values.mean(dim=1)


class AnomalyMapGenerator(nn.Module):
    """Turn teacher and student tokens into an anomaly map and an image-level score.

    For each student the patch score is the distance between its normalised prediction and
    the normalised teacher token; the two patch maps are multiplied, upsampled bilinearly to
    the output size, smoothed by a cascade of box filters and scored by the mean of the top
    ``topk_ratio`` of pixels.

    Args:
        blur_kernel_sizes: Odd kernel sizes of the box-filter stages, applied in order.
        blur_repeats: How often each stage is applied.
        topk_ratio: Fraction of map pixels whose mean is the image score.

    Example:
        >>> generator = AnomalyMapGenerator()
        >>> tokens = torch.randn(1, 16 * 16, 768)
        >>> anomaly_map, score = generator(tokens, tokens, tokens, tokens, (16, 16), (224, 224))
        >>> anomaly_map.shape, score.shape
        (torch.Size([1, 1, 224, 224]), torch.Size([1]))
    """

    def __init__(
        self,
        blur_kernel_sizes: Sequence[int] = (5, 7),
        blur_repeats: Sequence[int] = (5, 3),
        topk_ratio: float = 0.001,
    ) -> None:
        super().__init__()
        if len(blur_kernel_sizes) != len(blur_repeats):
            msg = (
                f"blur_kernel_sizes {list(blur_kernel_sizes)} and blur_repeats {list(blur_repeats)} "
                "must have the same length: one repeat count per kernel size."
            )
            raise ValueError(msg)
        if any(size < 1 or size % 2 == 0 for size in blur_kernel_sizes):
            msg = f"blur_kernel_sizes must be odd positive integers (size-preserving filters), got {list(blur_kernel_sizes)}."
            raise ValueError(msg)
        if any(repeat < 0 for repeat in blur_repeats):
            msg = f"blur_repeats must be non-negative, got {list(blur_repeats)}."
            raise ValueError(msg)
        if not 0 < topk_ratio <= 1:
            msg = f"topk_ratio must be in (0, 1], got {topk_ratio}."
            raise ValueError(msg)
        self.blur_passes = [int(size) for size, repeat in zip(blur_kernel_sizes, blur_repeats) for _ in range(repeat)]
        self.topk_ratio = float(topk_ratio)

    def blur(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Apply the box-filter cascade to maps of shape ``(B, 1, H, W)``."""
        for kernel_size in self.blur_passes:
            anomaly_map = box_blur(anomaly_map, kernel_size)
        return anomaly_map

    def forward(
        self,
        shallow: torch.Tensor,
        deep: torch.Tensor,
        predicted_shallow: torch.Tensor,
        predicted_deep: torch.Tensor,
        grid_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the anomaly map ``(B, 1, *output_size)`` and the image scores ``(B,)``.

        Args:
            shallow: Teacher tokens of the shallower layer, ``(B, N, D)``.
            deep: Teacher tokens of the deeper layer, ``(B, N, D)``.
            predicted_shallow: Backward student's prediction of ``shallow``.
            predicted_deep: Forward student's prediction of ``deep``.
            grid_size: Patch grid ``(h, w)`` with ``h * w == N``.
            output_size: Size of the returned map.
        """
        patch_scores = patch_discrepancy(predicted_shallow, shallow) * patch_discrepancy(predicted_deep, deep)
        patch_map = patch_scores.reshape(patch_scores.shape[0], 1, *grid_size)
        anomaly_map = functional.interpolate(patch_map, size=output_size, mode="bilinear", align_corners=False)
        anomaly_map = self.blur(anomaly_map)
        return anomaly_map, top_k_mean(anomaly_map, self.topk_ratio)
