"""The Teacher-Student network in plain PyTorch: frozen ViT teacher, forward and backward students."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional

from ..training.chunked_step import chunks
from ..training.settings import positive_int
from .anomaly_map import AnomalyMapGenerator, square_padding
from .precision import float32_maths
from .students import StudentMLP
from .teacher import TeacherFeatureExtractor
from .tiling import TileLayout, stitch


def cosine_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos`` over all tokens (eps 1e-6, as the reference)."""
    return (1 - functional.cosine_similarity(prediction, target, dim=-1, eps=1e-6)).mean()


class TransformerStudentModel(nn.Module):
    """Teacher plus two students that learn to map one teacher depth to the other.

    The forward student maps the shallow layer's tokens to the deep layer's, the backward
    student the reverse. In training mode ``forward`` returns the summed cosine loss; in eval
    mode it returns an :class:`~anomalib.data.InferenceBatch` with ``pred_score`` ``(B,)`` and
    ``anomaly_map`` ``(B, 1, H, W)`` at the input's size.

    Teacher and students compute in the precision of the surrounding autocast (the trainer's
    ``precision``); the teacher's tokens, the loss and the map maths are float32 (see :mod:`.precision`).

    Args:
        teacher: The frozen feature extractor; it decides token width, patch grid and input size.
        blur_kernel_sizes: Box-filter stages of the map smoothing.
        blur_repeats: Repetitions of each stage.
        topk_ratio: Fraction of map pixels averaged into the image score.
        teacher_batch_size: Most images (tiles) the teacher takes at once outside export; larger
            batches run in chunks of this size, which bounds memory and, on CPUs, keeps the cost
            per image that of a small batch. ``None`` runs every batch whole. Exported graphs
            always run the whole batch at once.

    Example:
        >>> from anomalib_transformer_student.model.teacher import TeacherFeatureExtractor, create_backbone
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
        teacher_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.teacher_batch_size = teacher_batch_size
        self.teacher = teacher
        self.forward_student = StudentMLP(teacher.embed_dim)
        self.backward_student = StudentMLP(teacher.embed_dim)
        self.anomaly_map_generator = AnomalyMapGenerator(blur_kernel_sizes, blur_repeats, topk_ratio)

    @property
    def teacher_batch_size(self) -> int | None:
        """Most images (tiles) the teacher takes at once outside export; ``None`` runs every batch whole."""
        return self._teacher_batch_size

    @teacher_batch_size.setter
    def teacher_batch_size(self, value: int | None) -> None:
        self._teacher_batch_size = None if value is None else positive_int("teacher_batch_size", value)

    def student_loss(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """Training loss from the teacher's tokens (callers may pass cached tokens), computed in float32."""
        predicted_deep, predicted_shallow = self.forward_student(shallow), self.backward_student(deep)
        with float32_maths(shallow.device):
            return cosine_loss(predicted_deep.float(), deep.float()) + cosine_loss(
                predicted_shallow.float(), shallow.float()
            )

    def teacher_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the teacher's shallow and deep tokens as float32, whatever precision the teacher ran in.

        Outside export, in chunks of at most ``teacher_batch_size`` images.
        """
        chunk = self.teacher_batch_size
        if chunk is not None and not torch.compiler.is_exporting() and len(images) > chunk:
            parts = [self._teacher_tokens(part) for part in images.split(chunk)]
            return torch.cat([shallow for shallow, _ in parts]), torch.cat([deep for _, deep in parts])
        return self._teacher_tokens(images)

    def _teacher_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shallow, deep = self.teacher(images)
        return shallow.float(), deep.float()

    def forward(
        self,
        images: torch.Tensor,
        original_size: tuple[int, int] | None = None,
        square_padded: bool = True,
        layout: TileLayout | None = None,
    ) -> torch.Tensor | InferenceBatch:
        """Loss in training mode, ``InferenceBatch(pred_score, anomaly_map)`` in eval mode.

        Args:
            images: Pre-processed images ``(B, 3, S, S)``, or with ``layout`` the pre-processed tiles
                ``(B * layout.count, 3, S, S)`` of ``B`` images, each image's tiles in a row.
            original_size: In eval mode, the ``(height, width)`` the images had before
                pre-processing: the map is returned at that size. ``None`` returns it at the
                input's size.
            square_padded: Whether the pre-processing padded the images to a square before
                resizing them: the map is then upsampled to the padded original size, smoothed
                there and cropped back to ``original_size`` (the paper's evaluation); else it is
                upsampled to ``original_size`` directly.
            layout: The tiles of a tiled image (:class:`~.tiling.TileLayout`): their patch scores are
                stitched into one patch map of the image, which is upsampled, smoothed and scored
                once, at the image's own size.
        """
        shallow, deep = self.teacher_features(images)
        if self.training:
            return self.student_loss(shallow, deep)
        return self.predict(shallow, deep, tuple(images.shape[-2:]), original_size, square_padded, layout)

    def predict(
        self,
        shallow: torch.Tensor,
        deep: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int] | None = None,
        square_padded: bool = True,
        layout: TileLayout | None = None,
    ) -> InferenceBatch:
        """``InferenceBatch(pred_score, anomaly_map)`` from the teacher's tokens (callers may pass cached tokens).

        Args:
            shallow: The teacher's shallow tokens ``(B, N, D)``.
            deep: The teacher's deep tokens ``(B, N, D)``.
            input_size: ``(height, width)`` of the images the teacher saw: the map's size when
                ``original_size`` is ``None``.
            original_size: As in :meth:`forward`.
            square_padded: As in :meth:`forward`.
            layout: As in :meth:`forward`; the tokens are then those of the tiles.
        """
        generator = self.anomaly_map_generator
        if layout is not None:
            return self.predict_tiled(self.patch_scores(shallow, deep), layout)
        output_size, window = tuple(input_size), None
        if original_size is not None and square_padded:
            side = square_padding(original_size)[0]
            output_size, window = (side, side), original_size
        elif original_size is not None:
            output_size = original_size
        predicted_shallow, predicted_deep = self.backward_student(deep), self.forward_student(shallow)
        with float32_maths(shallow.device):
            anomaly_map, pred_score = generator(
                shallow=shallow.float(),
                deep=deep.float(),
                predicted_shallow=predicted_shallow.float(),
                predicted_deep=predicted_deep.float(),
                grid_size=self.teacher.grid_size,
                output_size=output_size,
                original_size=window,
            )
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def patch_scores(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """Patch scores ``(B, N)`` from the teacher's tokens ``(B, N, D)``: the product of both students' discrepancies.

        Row by row: the scores of some tiles do not depend on the others, so that a tiled image's
        tiles can be scored chunk by chunk and only their scores kept (see :meth:`predict_tiled`).
        """
        predicted_shallow, predicted_deep = self.backward_student(deep), self.forward_student(shallow)
        with float32_maths(shallow.device):
            return self.anomaly_map_generator.patch_scores(
                shallow.float(), deep.float(), predicted_shallow.float(), predicted_deep.float()
            )

    def predict_tiled(self, patch_scores: torch.Tensor, layout: TileLayout) -> InferenceBatch:
        """``InferenceBatch(pred_score, anomaly_map)`` of tiled images from their tiles' :meth:`patch_scores`.

        Args:
            patch_scores: Scores ``(B * layout.count, N)`` of the tiles of ``B`` images, each image's tiles
                in a row; they are stitched into one patch map per image, which is upsampled, smoothed and
                scored once, at the image's own size.
            layout: The tiles' :class:`~.tiling.TileLayout`.
        """
        generator = self.anomaly_map_generator
        patch_map = stitch(patch_scores.float().reshape(-1, *self.teacher.grid_size), layout)
        with float32_maths(patch_map.device):
            anomaly_map = generator.smooth(patch_map, layout.canvas, window=layout.window)
            return InferenceBatch(pred_score=generator.score(anomaly_map), anomaly_map=anomaly_map)

    def predict_in_chunks(
        self,
        tiles: torch.Tensor,
        layout: TileLayout,
        tokens: Callable[[range, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> InferenceBatch:
        """:meth:`predict_tiled` with the tiles' tokens taken ``teacher_batch_size`` tiles at a time.

        ``tokens(part, tiles[part])`` gives the shallow and deep tokens of the tiles ``part`` of the batch
        (from the teacher or a cache); only each chunk's patch scores are kept, so one chunk's tokens are
        alive at a time, however many tiles an image has.
        """
        scores = [
            self.patch_scores(*tokens(part, tiles[part.start : part.stop]))
            for part in chunks(len(tiles), self.teacher_batch_size)
        ]
        return self.predict_tiled(torch.cat(scores), layout)
