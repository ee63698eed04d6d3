"""From teacher/student discrepancy to an anomaly map and an image score.

Pure tensor maths whose shapes follow the input's, so that it exports to ONNX/OpenVINO at a fixed or any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional

# Largest denominator of ``topk_ratio`` as a fraction in an exported graph; keeps its integers within int64.
RATIO_DENOMINATOR_LIMIT = 10**6


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


def square_padding(original_size: tuple[int, int]) -> tuple[int, int, int]:
    """Side of the square anomalib's ``SquarePad`` makes of ``original_size``, and its top and left padding.

    ``SquarePad`` puts the smaller half of the padding before the image. ``torch.sym_max``
    keeps the arithmetic traceable when the sizes are symbolic.
    """
    height, width = original_size
    side = torch.sym_max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def box_blur_1d(signals: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """One pass of a ``kernel_size`` mean filter along the last axis, zero padding counted in the mean.

    Written as a sum of shifted slices: on CPU this is many times faster than pooling or
    convolving a single-channel tensor, and it exports as plain slices and adds.
    """
    pad = kernel_size // 2
    length = signals.shape[-1]
    padded = functional.pad(signals, (pad, pad))
    total = padded[..., :length]
    for offset in range(1, kernel_size):
        total = total + padded[..., offset : offset + length]
    return total / kernel_size


def smoothing_matrix(grid: int, size: int, blur_passes: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """How each of ``size`` output pixels along one axis mixes the ``grid`` patch rows.

    Bilinear upsampling (``align_corners=False``) and a zero-padded box filter both act on
    each axis separately, so upsampling a patch map ``P`` and blurring it ``len(blur_passes)``
    times equals ``A @ P @ B.T`` with ``A = smoothing_matrix(rows)`` and
    ``B = smoothing_matrix(columns)``. The matrix is built from ``interpolate`` on an
    identity, so the interpolation weights are exactly PyTorch's.

    Args:
        grid: Number of patches along the axis.
        size: Number of output pixels along the axis.
        blur_passes: Kernel sizes of the box-filter passes, in order.
        like: Tensor whose device and dtype the matrix takes.

    Returns:
        Matrix of shape ``(size, grid)``.
    """
    identity = torch.eye(grid, device=like.device, dtype=like.dtype)
    upsampled = functional.interpolate(identity[None, None], size=(size, grid), mode="bilinear", align_corners=False)
    columns = upsampled[0, 0].T  # (grid, size): filter along the output axis
    for kernel_size in blur_passes:
        columns = box_blur_1d(columns, kernel_size)
    return columns.T


def top_k_mean(anomaly_map: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean of the highest ``max(1, int(H * W * ratio))`` values of each map.

    Args:
        anomaly_map: Maps of shape ``(B, 1, H, W)``.
        ratio: Fraction of pixels that make the score, in ``(0, 1]``.

    Returns:
        Scores of shape ``(B,)``.
    """
    height, width = anomaly_map.shape[-2:]
    # The mean does not depend on order; unsorted selection is about twice as fast.
    return torch.topk(anomaly_map.flatten(1), k=top_k_count(height, width, ratio), dim=1, sorted=False).values.mean(1)


def top_k_count(height: int, width: int, ratio: float) -> int:
    """How many of a ``height`` x ``width`` map's pixels make its score: ``max(1, int(height * width * ratio))``.

    In this order, as the reference: in floating point 0.35 * 10 * 18 gives 63, 10 * 18 * 0.35 gives 62.
    With symbolic sizes (an export without a fixed input size) the count is computed in integers,
    ``height * width * p // q`` with ``ratio`` as the fraction ``p / q`` of its decimal form, so that the
    graph computes it from the input's shape: the same count as the float product for the default
    0.001 (and 0.01, 0.005, 0.002, 0.1, 0.25, ...) at every size, one more for ratios whose float lies
    below their decimal (0.35) at some sizes.

    Example:
        >>> top_k_count(1036, 1036, 0.001), top_k_count(10, 10, 0.001)
        (1073, 1)
    """
    if isinstance(height, int) and isinstance(width, int):
        return max(1, int(height * width * ratio))
    fraction = Fraction(repr(ratio)).limit_denominator(RATIO_DENOMINATOR_LIMIT)
    return torch.sym_max(1, height * width * fraction.numerator // fraction.denominator)


@dataclass(frozen=True)
class AnomalyMapSettings:
    """How patch discrepancies become a map and a score (``TransformerStudent``'s ``anomaly_map``).

    The defaults are the paper's. On the anomalib CLI ``--model.anomaly_map.topk_ratio 0.01``; in YAML
    ``anomaly_map: {topk_ratio: 0.01}``; in Python ``anomaly_map=AnomalyMapSettings(topk_ratio=0.01)`` or
    ``anomaly_map={"topk_ratio": 0.01}``. Checked by :class:`AnomalyMapGenerator`.

    Args:
        blur_kernel_sizes: Odd box-filter sizes of the map smoothing stages.
        blur_repeats: How often each smoothing stage is applied.
        topk_ratio: Fraction of map pixels whose mean is the image score.

    Example:
        >>> from dataclasses import asdict
        >>> AnomalyMapGenerator(**asdict(AnomalyMapSettings(topk_ratio=0.01))).topk_ratio
        0.01
    """

    blur_kernel_sizes: tuple[int, ...] = (5, 7)
    blur_repeats: tuple[int, ...] = (5, 3)
    topk_ratio: float = 0.001

    def __post_init__(self) -> None:
        # Lists from YAML or a checkpoint compare equal to the defaults.
        object.__setattr__(self, "blur_kernel_sizes", tuple(self.blur_kernel_sizes))
        object.__setattr__(self, "blur_repeats", tuple(self.blur_repeats))


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
            msg = (
                "blur_kernel_sizes must be odd positive integers (size-preserving filters), "
                f"got {list(blur_kernel_sizes)}."
            )
            raise ValueError(msg)
        if any(repeat < 0 for repeat in blur_repeats):
            msg = f"blur_repeats must be non-negative, got {list(blur_repeats)}."
            raise ValueError(msg)
        if not 0 < topk_ratio <= 1:
            msg = f"topk_ratio must be in (0, 1], got {topk_ratio}."
            raise ValueError(msg)
        self.blur_passes = [
            int(size) for size, repeat in zip(blur_kernel_sizes, blur_repeats, strict=True) for _ in range(repeat)
        ]
        self.topk_ratio = float(topk_ratio)

    def smooth(
        self,
        patch_map: torch.Tensor,
        output_size: tuple[int, int],
        original_size: tuple[int, int] | None = None,
        *,
        window: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """Bilinear upsampling to ``output_size`` followed by the box-filter cascade.

        Computed as ``A @ patch_map @ B.T`` (see :func:`smoothing_matrix`), which equals
        interpolating and then blurring the full map (to float rounding) at a fraction of the
        cost, and which can produce just a window of that map: with ``original_size`` only the
        region of the original image inside the square-padded ``output_size`` is computed.

        Args:
            patch_map: Patch scores ``(B, h, w)``.
            output_size: Size the reference upsamples and blurs at.
            original_size: ``(height, width)`` of the image inside the square ``output_size``
                (placed as :func:`square_padding` says); only that window is returned.
            window: ``(top, left, height, width)`` of the image inside ``output_size`` (the
                canvas of a tiled image); only that window is returned.

        Returns:
            Maps ``(B, 1, H, W)``: ``output_size``, or the image's size when ``original_size``
            or ``window`` is given.
        """
        rows = smoothing_matrix(patch_map.shape[-2], output_size[0], self.blur_passes, patch_map)
        columns = smoothing_matrix(patch_map.shape[-1], output_size[1], self.blur_passes, patch_map)
        if original_size is not None:
            _, top, left = square_padding(original_size)
            window = (top, left, *original_size)
        if window is not None:
            top, left, height, width = window
            rows, columns = rows[top : top + height], columns[left : left + width]
        return (rows @ patch_map @ columns.T).unsqueeze(1)

    def patch_scores(
        self,
        shallow: torch.Tensor,
        deep: torch.Tensor,
        predicted_shallow: torch.Tensor,
        predicted_deep: torch.Tensor,
    ) -> torch.Tensor:
        """Product of the two students' patch discrepancies, ``(B, N)``."""
        return patch_discrepancy(predicted_shallow, shallow) * patch_discrepancy(predicted_deep, deep)

    def score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Image scores ``(B,)``: the mean of the top ``topk_ratio`` of each map's pixels."""
        return top_k_mean(anomaly_map, self.topk_ratio)

    def forward(
        self,
        shallow: torch.Tensor,
        deep: torch.Tensor,
        predicted_shallow: torch.Tensor,
        predicted_deep: torch.Tensor,
        grid_size: tuple[int, int],
        output_size: tuple[int, int],
        original_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the anomaly map and the image scores ``(B,)``.

        Args:
            shallow: Teacher tokens of the shallower layer, ``(B, N, D)``.
            deep: Teacher tokens of the deeper layer, ``(B, N, D)``.
            predicted_shallow: Backward student's prediction of ``shallow``.
            predicted_deep: Forward student's prediction of ``deep``.
            grid_size: Patch grid ``(h, w)`` with ``h * w == N``.
            output_size: Size the map is upsampled and blurred at, and returned at unless
                ``original_size`` is given.
            original_size: The image's size before square padding; the map is then cropped to
                it (``output_size`` must be the padded square) and scored there, as the paper does.

        Returns:
            The map ``(B, 1, H, W)`` and the mean of its top ``topk_ratio`` pixels.
        """
        patch_scores = self.patch_scores(shallow, deep, predicted_shallow, predicted_deep)
        patch_map = patch_scores.reshape(patch_scores.shape[0], *grid_size)
        anomaly_map = self.smooth(patch_map, output_size, original_size)
        return anomaly_map, self.score(anomaly_map)
