"""Square padding and antialiased bicubic resizing as two matrix products, identical in every runtime.

The model's input is each image edge-padded to a square and shrunk (or enlarged) to the
teacher's side with antialiased bicubic interpolation, as the authors' PIL pipeline does.
Runtimes disagree on antialiased resizing: OpenVINO's and ONNX Runtime's differ from
PyTorch's, which is why anomalib exports its models with antialiasing turned off. Here the
resize is written as what it is, a fixed linear map per axis: an image ``X`` (``H x W``)
becomes ``A_h @ X @ A_w.T``, where ``A`` holds the interpolation weights of one axis with the
edge padding folded in. The weights are computed from the input's size with plain tensor
operations, so one graph takes any height and width, and validation, test, predict,
``forward`` and every exported model compute the same pixels.

The weights are those of PyTorch's antialiased bicubic kernel (``interpolate(...,
mode="bicubic", antialias=True)``, itself PIL's): the Keys cubic with ``a = -0.5``, stretched
by the scale factor when shrinking, normalised to sum to one over the pixels inside the image.
"""

from __future__ import annotations

from typing import Any

import torch
from anomalib.data.transforms import SquarePad
from anomalib.pre_processing.utils._transform_registry import TRANSFORM_REGISTRY
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode, Transform
from torchvision.transforms.v2 import functional as tvf

CUBIC_A = -0.5  # PIL's and PyTorch's antialiased bicubic


def cubic_weight(distance: torch.Tensor) -> torch.Tensor:
    """The Keys cubic convolution kernel (``a = -0.5``), zero beyond two samples."""
    x = distance.abs()
    near = ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * CUBIC_A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def padded_resize_weights(length: int, padded: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """``(size, length)`` weights of edge-padding ``length`` pixels (centred) to ``padded``, then resizing to ``size``.

    Output pixel ``i`` is centred at ``(i + 0.5) * scale`` in padded pixels (``scale = padded / size``) and
    weighs padded pixel ``p`` by the cubic at ``(p + 0.5 - centre) / max(scale, 1)``: when shrinking, the
    kernel is widened by ``scale``, so every pixel contributes (antialiasing); the weights are
    normalised to sum to one, as ``interpolate(mode="bicubic", antialias=True, align_corners=False)`` does.
    Edge padding repeats the first and last pixel, so their columns also collect the weights of the
    padding before and after the image (anomalib's ``SquarePad`` puts the smaller half before).

    Written with masks and broadcasting only (no slicing by symbolic bounds), so that a graph traced for
    one size holds for every ``length`` and ``padded``; ``size`` is fixed.

    Example:
        >>> weights = padded_resize_weights(6, 8, 4, torch.empty(0))
        >>> weights.shape, bool(torch.allclose(weights.sum(1), torch.ones(4)))
        (torch.Size([4, 6]), True)
    """
    padded_positions = torch.arange(padded, device=like.device, dtype=like.dtype)
    image_positions = torch.arange(length, device=like.device, dtype=like.dtype)
    scale = torch.ones_like(padded_positions).sum() / size  # padded / size, a tensor that follows a symbolic size
    centres = (torch.arange(size, device=like.device, dtype=like.dtype)[:, None] + 0.5) * scale
    stretch = scale.clamp(min=1.0)
    before = (padded - length) // 2
    padded_weights = cubic_weight((padded_positions + 0.5 - centres) / stretch)  # (size, padded)
    image_weights = cubic_weight((image_positions + before + 0.5 - centres) / stretch)  # (size, length)
    first = (padded_weights * (padded_positions < before)).sum(dim=1, keepdim=True)
    last = (padded_weights * (padded_positions >= before + length)).sum(dim=1, keepdim=True)
    edges = first * (image_positions == 0) + last * (image_positions == length - 1)
    return (image_weights + edges) / padded_weights.sum(dim=1, keepdim=True)


def square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Edge-pad images ``(..., H, W)`` to a square and resize them to ``size`` x ``size`` (antialiased bicubic).

    Equals anomalib's ``SquarePad`` followed by ``interpolate(mode="bicubic", antialias=True)`` to float
    rounding, without building the padded image (a 6000 x 2 strip costs no 6000 x 6000 square).

    Example:
        >>> square_resize(torch.rand(1, 3, 150, 100), 56).shape
        torch.Size([1, 3, 56, 56])
    """
    height, width = images.shape[-2:]
    if isinstance(height, int) and isinstance(width, int) and height == width == size:
        return images
    side = torch.sym_max(height, width)
    rows = padded_resize_weights(height, side, size, images)
    columns = padded_resize_weights(width, side, size, images)
    if isinstance(height, int) and isinstance(width, int) and height < width:
        return rows @ (images @ columns.T)  # the cheaper order for wide images (outside symbolic export)
    return (rows @ images) @ columns.T


class SquareResize(Transform):
    """Edge-pad to a square and resize with antialiased bicubic weights, as one exportable linear map.

    Images (plain tensors and ``tv_tensors.Image``) go through :func:`square_resize`; masks are
    zero-padded and resized by nearest neighbour, as anomalib's ``SquarePad`` and torchvision's
    ``Resize`` treat them. anomalib's ``get_exportable_transform`` leaves this transform as it is, so
    the exported graph resizes exactly as validation does.

    Args:
        size: Side of the square output.

    Example:
        >>> SquareResize(112)(torch.rand(2, 3, 300, 200)).shape
        torch.Size([2, 3, 112, 112])
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def _transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        del params
        if isinstance(inpt, tv_tensors.Mask):
            padded = tv_tensors.wrap(SquarePad()(inpt), like=inpt)
            return tvf.resize(padded, [self.size, self.size], interpolation=InterpolationMode.NEAREST)
        if isinstance(inpt, tv_tensors.TVTensor):
            return tv_tensors.wrap(square_resize(inpt.as_subclass(torch.Tensor), self.size), like=inpt)
        return square_resize(inpt, self.size)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """``_transform`` under the name newer torchvision versions call."""
        return self._transform(inpt, params)

    def extra_repr(self) -> str:
        """The output side, for the feature cache's description of the pre-processing."""
        return f"size={self.size}"


TRANSFORM_REGISTRY.register(SquareResize, f"{__name__}.SquareResize")
