"""Anomaly maps at each image's own resolution, as the paper evaluates.

The model sees a square-padded, resized copy of each image. To score pixels against ground
truth at full resolution, the map is upsampled to the square-padded original size and the
padding is cropped away again. This needs the original size at evaluation time, and anomalib
loses it twice: its datamodule resizes images (and masks) inside the dataset whenever the
model's pre-processing contains a top-level ``Resize``, and its ``PreProcessor`` resizes
``batch.image`` and ``batch.gt_mask`` before ``test_step`` runs. :class:`OriginalSizePreProcessor`
avoids both, so ``gt_mask`` stays at full resolution and the model pre-processes the image
itself.

:func:`evaluation_input` is the one owner of evaluation geometry: the validation, test and
predict steps and the exported ``forward`` all ask it what the teacher receives and at which
size the anomaly map comes back, so the two paths cannot disagree; :func:`training_input` does
the same for training batches.

With tiling (:mod:`.tiling`), the pre-processor also leaves training batches at their original
size, and cuts every image larger than one tile into tiles, each passed through ``transform``
(which leaves a square tile square and resizes it to the teacher's input).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from anomalib.data.transforms import SquarePad
from anomalib.pre_processing import PreProcessor
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Transform

from .resize import SquareResize
from .tiling import TileLayout, Tiling

if TYPE_CHECKING:
    from anomalib.data import Batch
    from lightning import LightningModule, Trainer


def square_resize_transform(image_size: int) -> Transform:
    """Edge-pad to a square, antialiased bicubic resize to ``image_size``, ImageNet normalisation.

    The pad and resize are one :class:`~.resize.SquareResize`: two matrix products that every
    runtime computes alike, so validation and the exported graph see the same pixels. It is no
    torchvision ``Resize``, so anomalib's datamodules (which copy a top-level ``Resize`` of the
    model's transform into the dataset) keep each image and mask at its original size. The
    normalisation comes first: padding and resizing (weights that sum to one) commute with it, and
    OpenVINO's CPU plugin fails to compile a fixed-size graph that normalises a matrix product's output.
    """
    return Compose([Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD), SquareResize(image_size)])


class OriginalSizePreProcessor(PreProcessor):
    """Pre-processor that, at evaluation, leaves batches at their original size.

    In training it behaves like anomalib's ``PreProcessor``. In validation, test and predict
    with ``keep_original_size`` it leaves ``batch.image`` and ``batch.gt_mask`` untouched: the
    model applies :attr:`transform` to the image itself, knows the original size, and returns
    the anomaly map at that size, so pixel metrics compare against full-resolution masks and
    image, mask and map of a batch share one size.

    Args:
        transform: Transform applied to images, e.g. :func:`square_resize_transform`.
        keep_original_size: Leave evaluation batches at their original size; ``False`` gives
            anomalib's usual behaviour (images and masks transformed before the step). Set by the
            model's ``full_resolution_maps``; not stored in checkpoints.
        tiling: Cut images larger than one tile into tiles (see :meth:`teacher_input`); training
            batches are then left at their original size too, and the model tiles them. Needs
            ``keep_original_size``.

    Example:
        >>> pre_processor = OriginalSizePreProcessor(square_resize_transform(224))
        >>> pre_processor.transform(torch.rand(1, 3, 300, 200)).shape
        torch.Size([1, 3, 224, 224])
        >>> tiling = Tiling(448, image_size=224, patch_size=14)
        >>> tiled = OriginalSizePreProcessor(square_resize_transform(224), tiling=tiling)
        >>> tiles, layout = tiled.teacher_input(torch.rand(1, 3, 600, 1000))
        >>> tiles.shape, layout.count
        (torch.Size([6, 3, 224, 224]), 6)
    """

    def __init__(
        self, transform: Transform | None = None, keep_original_size: bool = True, tiling: Tiling | None = None
    ) -> None:
        super().__init__(transform=transform)
        if tiling is not None and not keep_original_size:
            msg = (
                "Tiling needs the images at their original size: it cannot be combined with "
                "keep_original_size=False (full_resolution_maps=False)."
            )
            raise ValueError(msg)
        self.keep_original_size = keep_original_size
        self.tiling = tiling

    def teacher_input(self, images: torch.Tensor, export: bool = False) -> tuple[torch.Tensor, TileLayout | None]:
        """What the teacher receives for images at their original size, and the tiles' layout.

        Without tiling, or for images that fit in one tile, the images pass through
        :attr:`transform` whole (the layout is ``None``); otherwise they are cut into tiles (each
        image's in a row), each passed through it.

        Args:
            images: Images ``(B, 3, H, W)`` at their original size.
            export: Use :attr:`export_transform` (as exported graphs do) instead of :attr:`transform`.

        Raises:
            ValueError: If tiling would cut the images into more tiles than it allows.
        """
        transform = self.export_transform if export else self.transform
        layout = None if self.tiling is None else self.tiling.layout(*images.shape[-2:])
        if layout is not None:
            images = self.tiling.split(images, layout)
        return (transform(images) if transform else images), layout

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The teacher's input for raw images, as an exported model computes it (tiles when tiling)."""
        return self.teacher_input(batch, export=True)[0]

    def on_train_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Batch,
        batch_idx: int,
    ) -> None:
        """Transform the batch as anomalib does; with tiling, leave it at its original size (the model tiles it)."""
        if self.tiling is None:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _transform_unless_kept(self, batch: Batch) -> None:
        if not self.keep_original_size and self.transform:
            batch.image, batch.gt_mask = self.transform(batch.image, batch.gt_mask)

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Leave the batch at its original size (or transform it, without ``keep_original_size``)."""
        del trainer, pl_module, batch_idx, dataloader_idx
        self._transform_unless_kept(batch)

    # Test and predict batches are treated like validation batches.
    on_test_batch_start = on_validation_batch_start
    on_predict_batch_start = on_validation_batch_start


def _transforms(transform: object) -> Iterator[object]:
    """``transform`` and every transform nested in it."""
    yield transform
    for inner in getattr(transform, "transforms", ()):
        yield from _transforms(inner)


def pads_to_square(transform: object) -> bool:
    """Whether ``transform`` pads images to a square (``SquareResize``, anomalib's ``SquarePad``) before resizing."""
    return any(isinstance(inner, (SquareResize, SquarePad)) for inner in _transforms(transform))


def training_input(pre_processor: nn.Module | None, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What the teacher receives for a training batch, and how many tiles each image makes.

    Without tiling the pre-processor's batch hook has already transformed the images (1 tile each);
    with tiling they arrive at their original size and are tiled here.

    Example:
        >>> tiling = Tiling(56, image_size=56, patch_size=14)
        >>> pre_processor = OriginalSizePreProcessor(square_resize_transform(56), tiling=tiling)
        >>> tiles, per_image = training_input(pre_processor, torch.rand(2, 3, 100, 100))
        >>> tuple(tiles.shape), per_image
        ((8, 3, 56, 56), 4)
    """
    if isinstance(pre_processor, OriginalSizePreProcessor) and pre_processor.tiling is not None:
        tiles, layout = pre_processor.teacher_input(images)
        return tiles, 1 if layout is None else layout.count
    return images, 1


def evaluation_input(
    pre_processor: nn.Module | None, images: torch.Tensor, *, pre_processed: bool
) -> tuple[torch.Tensor, dict[str, Any]]:
    """What the model receives for evaluation images, and where their map goes.

    With an :class:`OriginalSizePreProcessor` that keeps the original size, the images arrive at
    their own size in both paths: they are transformed here, and the map comes back at that size
    (cut from the square-padded original when the transform pads, else stretched back). With any
    other pre-processor the map comes at the pre-processed size: the evaluation steps receive
    images that the pre-processor's batch hooks already transformed (together with their masks),
    and ``forward`` transforms them here. As everywhere in anomalib, ``forward`` applies the
    pre-processor's export transform; with the default pre-processor it is the transform itself
    (:class:`~.resize.SquareResize` keeps its antialiasing in exported graphs), so both paths give
    the teacher the same pixels.

    Args:
        pre_processor: The model's pre-processor, or ``None``.
        images: Evaluation images ``(B, 3, H, W)``.
        pre_processed: ``True`` in the validation, test and predict steps (after the
            pre-processor's batch hooks), ``False`` in ``forward`` (raw images, as exported).

    Returns:
        The teacher's input and the keyword arguments that place the map for
        :class:`TransformerStudentModel`: ``original_size`` and ``square_padded``, or ``layout``
        for a tiled image (the input then holds its tiles).

    Example:
        >>> pre_processor = OriginalSizePreProcessor(square_resize_transform(112))
        >>> inputs, placement = evaluation_input(pre_processor, torch.rand(1, 3, 150, 100), pre_processed=True)
        >>> tuple(inputs.shape), placement
        ((1, 3, 112, 112), {'original_size': (150, 100), 'square_padded': True})
    """
    if isinstance(pre_processor, OriginalSizePreProcessor) and pre_processor.keep_original_size:
        model_input, layout = pre_processor.teacher_input(images, export=not pre_processed)
        if layout is not None:
            return model_input, {"layout": layout}
        transform = pre_processor.transform if pre_processed else pre_processor.export_transform
        return model_input, {"original_size": tuple(images.shape[-2:]), "square_padded": pads_to_square(transform)}
    if pre_processed or not pre_processor:
        return images, {}
    return pre_processor(images), {}
