"""Anomaly maps at each image's own resolution, as the paper evaluates.

The model sees a square-padded, resized copy of each image. To score pixels against ground
truth at full resolution, the map is upsampled to the square-padded original size and the
padding is cropped away again. This needs the original size at evaluation time, and anomalib
loses it twice: its datamodule resizes images (and masks) inside the dataset whenever the
model's pre-processing contains a top-level ``Resize``, and its ``PreProcessor`` resizes
``batch.image`` and ``batch.gt_mask`` before ``test_step`` runs. :class:`OriginalSizePreProcessor`
avoids both, so ``gt_mask`` stays at full resolution and the model pre-processes the image
itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib.data.transforms import SquarePad
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize, Transform

if TYPE_CHECKING:
    from anomalib.data import Batch
    from lightning import LightningModule, Trainer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def square_resize_transform(image_size: int) -> Transform:
    """Edge-pad to a square, bicubic resize to ``image_size``, ImageNet normalisation.

    The pad and resize are nested in an inner ``Compose`` on purpose: anomalib's datamodules
    copy a *top-level* ``Resize`` of the model's transform into the dataset (resizing images
    and masks before collation, and before the square padding, which distorts non-square
    images). Nested, the resize happens on the batch, after padding, and the dataset keeps
    each image and mask at its original size.
    """
    return Compose(
        [
            Compose(
                [
                    SquarePad(),
                    Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
                ]
            ),
            Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


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

    Example:
        >>> pre_processor = OriginalSizePreProcessor(square_resize_transform(224))
        >>> pre_processor.transform(torch.rand(1, 3, 300, 200)).shape
        torch.Size([1, 3, 224, 224])
    """

    def __init__(self, transform: Transform | None = None, keep_original_size: bool = True) -> None:
        super().__init__(transform=transform)
        self.keep_original_size = keep_original_size

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
