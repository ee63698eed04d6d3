"""The teacher's tokens of a batch: through a teacher-feature cache when one is open for the stage.

One front end serves both caches of a fit. The training cache keeps each training image's tokens
from the first epoch for every later one. The evaluation cache keeps each validation and test
image's tokens from its first validation for every later validation and the test after the fit
(anomalib validates after every epoch, on MVTec AD on the test images, and ``anomalib train``
tests on them once more); its entries are float32, so maps, scores, normalisation statistics and
thresholds do not move. Predict batches (usually new images, seen once) are never cached.

For each, :class:`CachedTeacherFeatures` decides whether the cache is on (off by default when the
stage's images are augmented, since they change every time), builds the fingerprint of everything
that shapes the features, opens the cache (kept while the fingerprint holds), turns caching off for
the run with one warning when its folder cannot be set up, and closes it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from anomalib.pre_processing.utils.spec import transform_to_spec

from .cache_folder import default_cache_dir
from .dtypes import CACHE_DTYPES
from .feature_cache import (
    ImageKeys,
    Teacher,
    TeacherFeatureCache,
    feature_fingerprint,
    process_memory_budget_mb,
    tile_keys,
)
from .settings import one_of

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

logger = logging.getLogger(__name__)

Purpose = Literal["training", "evaluation"]
# The stages each cache serves, and per stage the datamodule's augmentation and the trainer's loaders.
PURPOSE_STAGES: dict[str, tuple[str, ...]] = {"training": ("fit",), "evaluation": ("validate", "test")}
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


class CachedTeacherFeatures:
    """Teacher tokens of training (or evaluation) batches, served from the cache after an image's first pass.

    Args:
        purpose: ``"training"`` (stage ``fit``, entries in ``dtype``) or ``"evaluation"`` (stages
            ``validate`` and ``test``, entries float32 so that maps and scores do not move).
        enabled: ``None`` turns the cache on unless the stage's images are augmented; ``True`` keeps
            it on even then (each image's features come from its first augmented version);
            ``False`` turns it off.
        cache_dir: Folder of the disk part; default :func:`~.cache_folder.default_cache_dir`.
        dtype: ``"float16"`` or ``"float32"``: storage of training entries.
        memory_budget_mb: Memory for entries before they spill to disk (per process).
        disk_budget_mb: Disk for the whole cache folder.
        shared: The folder is shared by a group of users or nodes (see :mod:`.cache_folder`).

    The values are checked where users give them (:class:`~.feature_caching.FeatureCacheSettings`) and where
    the cache uses them (:class:`~.feature_cache.TeacherFeatureCache`), not again here.

    Example:
        >>> features = CachedTeacherFeatures("training", enabled=False)
        >>> teacher = lambda images: (images.flatten(2).mT, images.flatten(2).mT)
        >>> shallow, deep = features.tokens(torch.zeros(2, 3, 4, 4), None, teacher)
        >>> shallow.shape
        torch.Size([2, 16, 3])
    """

    def __init__(
        self,
        purpose: Purpose,
        enabled: bool | None = None,
        cache_dir: str | Path | None = None,
        dtype: str = "float16",
        memory_budget_mb: float = 4096.0,
        disk_budget_mb: float = 20480.0,
        shared: bool = False,
    ) -> None:
        self.purpose = one_of("purpose", purpose, PURPOSE_STAGES)
        self.enabled = enabled
        self.cache_dir = cache_dir
        self.dtype = "float32" if purpose == "evaluation" else dtype
        self.memory_budget_mb = memory_budget_mb
        self.disk_budget_mb = disk_budget_mb
        self.shared = shared
        self.cache: TeacherFeatureCache | None = None
        self.fingerprint: str | None = None
        self.active = False  # the current stage reads and fills the cache
        self._unusable: Path | None = None  # a folder that failed this run: not tried again until close
        self._noted: set[str] = set()  # stages whose augmentation note was logged: once per stage and model
        self._image_keys = ImageKeys()

    @property
    def directory(self) -> Path:
        """The cache folder."""
        return Path(self.cache_dir or default_cache_dir()).expanduser()

    def fingerprint_of(self, weights_digest: str, identity: Mapping[str, Any], augmentations: object = None) -> str:
        """Fingerprint of what shapes the cached features: ``identity``, weights, purpose, dtype, augmentation."""
        return feature_fingerprint(
            {
                **identity,
                "weights": weights_digest,
                "purpose": self.purpose,
                "cache_dtype": self.dtype,
                "augmentations": None if augmentations is None else repr(augmentations),
            }
        )

    def _wanted(self, trainer: Trainer, stage: str) -> tuple[bool, object]:
        """Whether the cache serves ``stage``, and the stage's augmentation."""
        if self.enabled is False or stage not in PURPOSE_STAGES[self.purpose]:
            return False, None
        augmentations = stage_augmentations(trainer, stage)
        if augmentations is None:
            return True, None
        if stage not in self._noted:  # the evaluation cache opens at every validation: one note per stage
            self._noted.add(stage)
            if self.enabled is None:
                logger.info(
                    "Teacher-feature cache off for %s: its images are augmented (%s), so the teacher's features "
                    "change every time. Set feature_cache.enabled=True to cache the first version anyway.",
                    stage,
                    augmentations,
                )
            else:
                logger.warning(
                    "feature_cache=True with %s-time augmentation (%s): each image's teacher features are computed "
                    "once, from its first augmented version, and reused later.",
                    stage,
                    augmentations,
                )
        return self.enabled is not None, augmentations

    def open(
        self,
        trainer: Trainer,
        stage: str,
        weights_digest: str,
        identity: Mapping[str, Any],
        memory_in_use: int = 0,
    ) -> None:
        """Keep, open or bypass the cache for ``stage`` (call once the teacher holds its weights).

        The open cache is kept while the fingerprint holds (later validations of a fit, and the test
        after it); it is replaced when anything that shapes the features changed (e.g. a checkpoint
        with another teacher was loaded). A folder that cannot be set up turns caching off for the
        run with one warning; the teacher then computes every batch, with the same results.

        Args:
            trainer: The trainer, for the stage's augmentation, the process's rank and the world size.
            stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
            weights_digest: Digest of the teacher's weights.
            identity: Everything else that shapes the features (teacher name, layers, input size,
                pre-processing, precision, tiling).
            memory_in_use: Bytes another cache holds in memory, deducted from this one's budget.
        """
        self.active = False
        wanted, augmentations = self._wanted(trainer, stage)
        if not wanted or self._unusable == self.directory:
            return
        fingerprint = self.fingerprint_of(weights_digest, identity, augmentations)
        if self.cache is None or fingerprint != self.fingerprint:
            self.close(trainer.global_rank)
            about = {key: identity.get(key) for key in ("teacher", "image_size", "layers", "tiling") if key in identity}
            try:
                self.cache = TeacherFeatureCache(
                    self.directory,
                    fingerprint,
                    dtype=CACHE_DTYPES[self.dtype],
                    memory_budget_mb=self.memory_budget_mb,
                    disk_budget_mb=self.disk_budget_mb,
                    rank=trainer.global_rank,
                    shared=self.shared,
                    about={**about, "purpose": self.purpose, "dtype": self.dtype},
                )
            except OSError as error:
                self._unusable = self.directory
                logger.warning(
                    "Teacher-feature cache off for this run: its folder '%s' cannot be used (%s). Training and "
                    "evaluation go on without it, with the same results. Point feature_cache.dir "
                    "(--model.feature_cache.dir) to a writable folder of your own, or set feature_cache=False to "
                    "silence this.",
                    self.directory,
                    error,
                )
                return
            self.fingerprint = fingerprint
            self._image_keys = ImageKeys()
            logger.info("Teacher-feature cache on for %s (%s); %s.", self.purpose, self.dtype, self.cache.summary())
        # Never below what it already holds, so that nothing cached is dropped.
        budget = int(process_memory_budget_mb(self.memory_budget_mb, trainer.world_size) * 2**20) - memory_in_use
        self.cache.memory_budget_bytes = max(budget, self.cache.memory_bytes, 0)
        self.active = True

    @property
    def memory_bytes(self) -> int:
        """Bytes the open cache holds in memory."""
        return 0 if self.cache is None else self.cache.memory_bytes

    def tokens(
        self,
        images: torch.Tensor,
        paths: Sequence[str] | None,
        teacher: Teacher,
        tiles_per_image: int = 1,
        tiles: range | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shallow and deep tokens of a batch: from the cache where it holds them, else from ``teacher``.

        With ``tiles_per_image`` above 1, the batch holds each image's tiles in a row, one entry each.
        ``tiles`` says which of the batch's entries (tiles, or images) ``images`` holds, when it holds only
        some of them (a chunk); ``None``: all. Without ``paths`` (images not from files) nothing is cached.
        """
        if self.cache is None or not self.active or not paths:
            return teacher(images)
        keys = tile_keys([None if path is None else self._image_keys(path) for path in paths], tiles_per_image)
        return self.cache.tokens(keys if tiles is None else keys[tiles.start : tiles.stop], images, teacher)

    def close(self, rank: int = 0) -> None:
        """Report and release the cache (memory freed, locks released; spill files stay for later runs)."""
        self.active = False
        self._unusable = None
        if self.cache is not None:
            logger.info("Teacher-feature cache for %s (rank %d): %s.", self.purpose, rank, self.cache.summary())
            self.cache.close()
            self.cache = None
            self.fingerprint = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (anomalib's ``to_torch`` saves the whole module) and copy without the open cache."""
        state = self.__dict__.copy()
        state.update(cache=None, fingerprint=None, active=False, _unusable=None, _image_keys=ImageKeys())
        return state

    def __del__(self) -> None:
        # A fit without a test keeps the evaluation cache until the model goes; then its locks go too.
        with contextlib.suppress(Exception):  # at interpreter shutdown, logging or files may be gone
            self.close()
