"""The teacher's tokens of training batches: through the teacher-feature cache when it is on.

:class:`TrainingFeatures` owns the cache's life in a fit: whether it is on (off by default when
the datamodule augments, since augmented images change every epoch), the fingerprint of
everything that shapes the features, opening it when training starts and reporting and closing
it when training ends. The Lightning module only asks it for each batch's tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib.pre_processing.utils.spec import transform_to_spec

from .dtypes import CACHE_DTYPES
from .feature_cache import (
    ImageKeys,
    Teacher,
    TeacherFeatureCache,
    default_cache_dir,
    ensure_writable,
    feature_fingerprint,
    process_memory_budget_mb,
    tile_keys,
    weights_digest,
)

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from torch import nn

logger = logging.getLogger(__name__)


# Per stage: the datamodule's augmentation attribute, and the trainer's dataloaders of that stage.
_STAGE_DATA = {
    "fit": ("train_augmentations", "train_dataloader"),
    "validate": ("val_augmentations", "val_dataloaders"),
    "test": ("test_augmentations", "test_dataloaders"),
}


def stage_augmentations(trainer: Trainer, stage: str) -> object:
    """The augmentation of the trainer's datamodule (or of its dataset) for ``stage``, if any.

    ``stage`` is ``"fit"`` (training images), ``"validate"`` or ``"test"``.
    """
    attribute, loaders_attribute = _STAGE_DATA[stage]
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, attribute):
        return getattr(datamodule, attribute)
    loaders = getattr(trainer, loaders_attribute)
    loader = loaders[0] if isinstance(loaders, Sequence) and loaders else loaders
    return getattr(getattr(loader, "dataset", None), "augmentations", None)


def pre_processing_spec(pre_processor: object) -> object:
    """A stable description of the pre-processor's transform, for the fingerprint."""
    transform = getattr(pre_processor, "transform", pre_processor)
    try:
        return transform_to_spec(transform)
    except ValueError:
        return repr(transform)


class TrainingFeatures:
    """Teacher tokens of training batches, served from the cache after an image's first epoch.

    Args:
        enabled: ``None`` turns the cache on unless the datamodule augments; ``True`` keeps it
            on even then (each image's features come from its first augmented version);
            ``False`` turns it off.
        cache_dir: Folder of the disk part; default :func:`default_cache_dir`.
        cache_dtype: ``"float16"`` or ``"float32"``.
        memory_budget_mb: Memory for entries before they spill to disk.
        disk_budget_mb: Disk for the spill files of one fingerprint (all runs and processes together).

    Example:
        >>> features = TrainingFeatures(enabled=False)
        >>> teacher = lambda images: (images.flatten(2).mT, images.flatten(2).mT)
        >>> shallow, deep = features.tokens(torch.zeros(2, 3, 4, 4), None, teacher)
        >>> shallow.shape
        torch.Size([2, 16, 3])
    """

    def __init__(
        self,
        enabled: bool | None = None,
        cache_dir: str | Path | None = None,
        cache_dtype: str = "float16",
        memory_budget_mb: float = 4096.0,
        disk_budget_mb: float = 20480.0,
    ) -> None:
        if cache_dtype not in CACHE_DTYPES:
            msg = f"cache_dtype must be one of {list(CACHE_DTYPES)}, got '{cache_dtype}'."
            raise ValueError(msg)
        self.enabled = enabled
        self.cache_dir = cache_dir
        self.cache_dtype = cache_dtype
        self.memory_budget_mb = memory_budget_mb
        self.disk_budget_mb = disk_budget_mb
        self.cache: TeacherFeatureCache | None = None
        self._image_keys = ImageKeys()

    def open(self, trainer: Trainer, teacher: nn.Module, identity: Mapping[str, Any]) -> None:
        """Open the cache for this fit, unless it is off (call once the teacher holds its weights).

        Args:
            trainer: The trainer, for its datamodule's augmentation and the process's rank.
            teacher: The teacher module; its weights are part of the fingerprint.
            identity: Everything else that shapes the features (teacher name, layers, input
                size, pre-processing, precision).
        """
        self.close(trainer.global_rank)
        if self.enabled is False:
            return
        augmentations = stage_augmentations(trainer, "fit")
        if augmentations is not None:
            if self.enabled is None:
                logger.info(
                    "Teacher-feature cache off: training applies augmentation (%s), so the teacher's features "
                    "change from epoch to epoch. Set feature_cache=True to cache the first version anyway.",
                    augmentations,
                )
                return
            logger.warning(
                "feature_cache=True with train-time augmentation (%s): each image's teacher features are "
                "computed once, from its first augmented version, and reused in later epochs.",
                augmentations,
            )
        directory = ensure_writable(self.cache_dir or default_cache_dir())
        fingerprint = self.fingerprint(teacher, identity, augmentations)
        self.cache = TeacherFeatureCache(
            directory,
            fingerprint,
            dtype=CACHE_DTYPES[self.cache_dtype],
            memory_budget_mb=process_memory_budget_mb(self.memory_budget_mb, trainer.world_size),
            disk_budget_mb=self.disk_budget_mb,
            rank=trainer.global_rank,
        )
        self._image_keys = ImageKeys()
        logger.info(
            "Teacher-feature cache on (%s, %s); disk part in %s.", self.cache_dtype, self.cache.summary(), directory
        )

    def fingerprint(self, teacher: nn.Module, identity: Mapping[str, Any], augmentations: object = None) -> str:
        """Fingerprint of what shapes the cached features: ``identity``, weights, storage dtype, augmentation."""
        return feature_fingerprint(
            {
                **identity,
                "weights": weights_digest(teacher),
                "cache_dtype": self.cache_dtype,
                "augmentations": None if augmentations is None else repr(augmentations),
            }
        )

    def tokens(
        self, images: torch.Tensor, paths: Sequence[str] | None, teacher: Teacher, tiles_per_image: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shallow and deep tokens of a batch: from the cache where it holds them, else from ``teacher``.

        With ``tiles_per_image`` above 1, ``images`` holds each image's tiles in a row, one entry each.
        """
        if self.cache is None:
            return teacher(images)
        paths = paths or [None] * (len(images) // tiles_per_image)
        keys = [None if path is None else self._image_keys(path) for path in paths]
        return self.cache.tokens(tile_keys(keys, tiles_per_image), images, teacher)

    def close(self, rank: int = 0) -> None:
        """Report (with the disk the spill files take) and release the cache; its disk part stays for later runs."""
        if self.cache is not None:
            logger.info("Teacher-feature cache (rank %d): %s.", rank, self.cache.summary())
            self.cache.close()
            self.cache = None
