"""The teacher's tokens of evaluation images: computed once per fit, not once per validation.

anomalib validates after every epoch, for MVTec AD on the test images (``val_split_mode:
same_as_test``), and ``anomalib train`` tests on them once more after the fit. The teacher and the
images do not change meanwhile, so :class:`EvaluationFeatures` keeps each evaluation image's
tokens from its first validation (or test) and hands them back to every later one, until the test
ends. Only the students and the anomaly map run again; they see the very tokens a fresh teacher
pass gives, since entries are stored as float32, so maps, scores, normalisation statistics and
thresholds do not move.

It is a second :class:`~.feature_cache.TeacherFeatureCache`, with the training cache's keys (the
content of each image, :class:`~.feature_cache.ImageKeys`), memory budget (shared with the
training cache while both are open) and spill files, under its own fingerprint: the teacher, its
weights and layers, the pre-processing (the evaluation input is the image at its own size passed
through the pre-processor's ``transform``), the stage's dataset augmentation, and
``"evaluation"``/float32. Predict batches (usually new images, seen once) are not cached.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

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
from .training_features import stage_augmentations

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from torch import nn

logger = logging.getLogger(__name__)

EVALUATION_STAGES = ("validate", "test")


def state_token(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Cheap change detector of a module's state: storage and in-place version of each tensor.

    Loading a state dict or moving the module changes it, so the (costly) weights digest is taken
    again only then, not at every validation.
    """
    return tuple((tensor.data_ptr(), tensor._version) for tensor in module.state_dict(keep_vars=True).values())


class EvaluationFeatures:
    """Teacher tokens of validation and test images, reused by every later validation and the test of a fit.

    Args:
        enabled: ``None`` (auto) caches unless the stage's dataset augments (anomalib's
            ``val_augmentations``/``test_augmentations``, or ``augmentations`` for all stages);
            train-time augmentation alone leaves it on, as it does not touch evaluation images.
            ``True`` caches even then (each image's first augmented version); ``False`` never.
        cache_dir: Folder of the disk part; default :func:`default_cache_dir`.
        memory_budget_mb: Memory for entries before they spill to disk, shared with the training
            cache while that is open.
        disk_budget_mb: Disk for the spill files of this fingerprint.

    Example:
        >>> features = EvaluationFeatures(enabled=False)
        >>> teacher = lambda images: (images.flatten(2).mT, images.flatten(2).mT)
        >>> shallow, deep = features.tokens(torch.zeros(2, 3, 4, 4), None, teacher)
        >>> shallow.shape
        torch.Size([2, 16, 3])
    """

    def __init__(
        self,
        enabled: bool | None = None,
        cache_dir: str | Path | None = None,
        memory_budget_mb: float = 4096.0,
        disk_budget_mb: float = 20480.0,
    ) -> None:
        self.enabled = enabled
        self.cache_dir = cache_dir
        self.memory_budget_mb = memory_budget_mb
        self.disk_budget_mb = disk_budget_mb
        self.cache: TeacherFeatureCache | None = None
        self.fingerprint: str | None = None
        self.active = False  # the current stage reads and fills the cache
        self._weights: tuple[tuple[tuple[int, int], ...], str] | None = None
        self._image_keys = ImageKeys()

    def _weights_digest(self, teacher: nn.Module) -> str:
        """:func:`weights_digest` of the teacher, taken again only when its state changed."""
        token = state_token(teacher)
        if self._weights is None or self._weights[0] != token:
            self._weights = (token, weights_digest(teacher))
        return self._weights[1]

    def open(
        self,
        trainer: Trainer,
        stage: str,
        teacher: nn.Module,
        identity: Mapping[str, Any],
        memory_in_use: int = 0,
    ) -> None:
        """Keep, open or bypass the cache for an evaluation stage (call once the teacher holds its weights).

        The open cache is kept when the fingerprint is unchanged (later validations of a fit, and
        the test after it); it is replaced when anything that shapes the features changed (e.g. a
        checkpoint with another teacher was loaded), and bypassed in predict.

        Args:
            trainer: The trainer, for the stage's dataset augmentation and the process's rank.
            stage: ``"validate"``, ``"test"`` or ``"predict"``.
            teacher: The teacher module; its weights are part of the fingerprint.
            identity: Everything else that shapes the features (teacher name, layers, input size,
                pre-processing, precision).
            memory_in_use: Bytes the training cache holds in memory, deducted from the budget.
        """
        self.active = False
        if self.enabled is False or stage not in EVALUATION_STAGES:
            return
        augmentations = stage_augmentations(trainer, stage)
        if augmentations is not None and self.enabled is None:
            logger.info(
                "Evaluation-feature cache off for %s: its images are augmented (%s). Set feature_cache=True to "
                "cache the first version anyway.",
                stage,
                augmentations,
            )
            return
        fingerprint = feature_fingerprint(
            {
                **identity,
                "weights": self._weights_digest(teacher),
                "purpose": "evaluation",
                "cache_dtype": "float32",
                "augmentations": None if augmentations is None else repr(augmentations),
            }
        )
        if self.cache is None or fingerprint != self.fingerprint:
            self.close(trainer.global_rank)
            self.cache = TeacherFeatureCache(
                ensure_writable(self.cache_dir or default_cache_dir()),
                fingerprint,
                dtype=torch.float32,  # exact: maps, scores and thresholds must not move
                memory_budget_mb=self.memory_budget_mb,
                disk_budget_mb=self.disk_budget_mb,
                rank=trainer.global_rank,
            )
            self.fingerprint = fingerprint
            self._image_keys = ImageKeys()
            logger.info("Evaluation-feature cache on (float32); disk part in %s.", self.cache.folder)
        # Never below what it already holds, so that nothing cached is dropped.
        budget = int(process_memory_budget_mb(self.memory_budget_mb, trainer.world_size) * 2**20) - memory_in_use
        self.cache.memory_budget_bytes = max(budget, self.cache.memory_bytes, 0)
        self.active = True

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
        some of them (a chunk); ``None``: all.
        """
        if self.cache is None or not self.active or paths is None:
            return teacher(images)
        keys = tile_keys([None if path is None else self._image_keys(path) for path in paths], tiles_per_image)
        return self.cache.tokens(keys if tiles is None else keys[tiles.start : tiles.stop], images, teacher)

    def close(self, rank: int = 0) -> None:
        """Report and release the cache (memory freed; spill files stay for later runs with this fingerprint)."""
        self.active = False
        if self.cache is not None:
            logger.info("Evaluation-feature cache (rank %d): %s.", rank, self.cache.summary())
            self.cache.close()
            self.cache = None
            self.fingerprint = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (anomalib's ``to_torch`` saves the whole module) and copy without the open cache."""
        state = self.__dict__.copy()
        state.update(cache=None, fingerprint=None, active=False, _weights=None, _image_keys=ImageKeys())
        return state

    def __del__(self) -> None:
        # A fit without a test keeps the cache until the model goes; then the lock and files go too.
        with contextlib.suppress(Exception):  # at interpreter shutdown, logging or files may be gone
            self.close()
