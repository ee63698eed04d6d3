"""The Teacher-Student network in plain PyTorch: frozen ViT teacher, forward and backward students."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional

from .anomaly_map import AnomalyMapGenerator
from .students import StudentMLP
from .teacher import TeacherFeatureExtractor


def cosine_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos`` over all tokens (eps 1e-6, as the reference)."""
    return (1 - functional.cosine_similarity(prediction, target, dim=-1, eps=1e-6)).mean()


class TransformerStudentModel(nn.Module):
    """Teacher plus two students that learn to map one teacher depth to the other.

    The forward student maps the shallow layer's tokens to the deep layer's, the backward
    student the reverse. In training mode ``forward`` returns the summed cosine loss; in eval
    mode it returns an :class:`~anomalib.data.InferenceBatch` with ``pred_score`` ``(B,)`` and
    ``anomaly_map`` ``(B, 1, H, W)`` at the input's size.

    Args:
        teacher: The frozen feature extractor; it decides token width, patch grid and input size.
        blur_kernel_sizes: Box-filter stages of the map smoothing.
        blur_repeats: Repetitions of each stage.
        topk_ratio: Fraction of map pixels averaged into the image score.

    Example:
        >>> from anomalib_transformer_student.teacher import TeacherFeatureExtractor, create_backbone
        >>> teacher = TeacherFeatureExtractor(create_backbone("vit_small_patch14_dinov2"), (7, 11), 112)
        >>> model = TransformerStudentModel(teacher).eval()
        >>> output = model(torch.randn(2, 3, 112, 112))
        >>> output.anomaly_map.shape, output.pred_score.shape
        (torch.Size([2, 1, 112, 112]), torch.Size([2]))
    """

    def __init__(
        self,
        teacher: TeacherFeatureExtractor,
        blur_kernel_sizes: Sequence[int] = (5, 7),
        blur_repeats: Sequence[int] = (5, 3),
        topk_ratio: float = 0.001,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.forward_student = StudentMLP(teacher.embed_dim)
        self.backward_student = StudentMLP(teacher.embed_dim)
        self.anomaly_map_generator = AnomalyMapGenerator(blur_kernel_sizes, blur_repeats, topk_ratio)

    def student_loss(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """Training loss from the teacher's tokens (callers may pass cached tokens)."""
        return cosine_loss(self.forward_student(shallow), deep) + cosine_loss(self.backward_student(deep), shallow)

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Loss in training mode, ``InferenceBatch(pred_score, anomaly_map)`` in eval mode."""
        shallow, deep = self.teacher(images)
        if self.training:
            return self.student_loss(shallow, deep)
        anomaly_map, pred_score = self.anomaly_map_generator(
            shallow=shallow,
            deep=deep,
            predicted_shallow=self.backward_student(deep),
            predicted_deep=self.forward_student(shallow),
            grid_size=self.teacher.grid_size,
            output_size=tuple(images.shape[-2:]),
        )
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
