"""The feature cache in a run, as a Lightning callback.

A training store serves ``fit``, an evaluation store (float32) the validations and the test after them. Each
works in a fresh run folder, removed when its stage ends, fails, or the interpreter exits; after a fit the
evaluation store goes to disk and releases its folder, which the test reopens (recomputing what vanished).
In DDP rank 0 makes the folder and broadcasts its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from anomalib.pre_processing.utils.spec import transform_to_spec
from lightning.pytorch import Callback

from ..training.teacher_checkpoint import TEACHER_PREFIX
from ..training.weights_digest import DigestMemo
from .run_folder import CacheRoot, RunFolder
from .settings import CacheSettings
from .spill_file import DamagedSpillFile
from .store import FeatureStore, ImageKeys, Teacher

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from lightning.pytorch import LightningModule, Trainer

logger = logging.getLogger(__name__)

PURPOSE_STAGES = {"training": ("fit",), "evaluation": ("validate", "test")}
_STAGE_DATA = {
    "fit": ("train_augmentations", "train_dataloader"),
    "validate": ("val_augmentations", "val_dataloaders"),
    "test": ("test_augmentations", "test_dataloaders"),
}


def stage_augmentations(trainer: Trainer, stage: str) -> object:
    """The augmentation of the trainer's datamodule (or of its dataset) for ``stage``, if any."""
    attribute, loaders_attribute = _STAGE_DATA[stage]
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, attribute):
        return getattr(datamodule, attribute)
    loaders = getattr(trainer, loaders_attribute)
    loader = loaders[0] if isinstance(loaders, Sequence) and loaders else loaders
    return getattr(getattr(loader, "dataset", None), "augmentations", None)


def feature_fingerprint(module: LightningModule, weights: str, purpose: str, dtype: str, augmentations: object) -> str:
    """SHA-256 of everything that shapes the cached features: teacher, weights, size, pre-processing, tiling, ..."""
    transform = getattr(module.pre_processor, "transform", module.pre_processor)
    try:
        spec = transform_to_spec(transform)
    except ValueError:
        spec = repr(transform)
    keep_size = getattr(module.pre_processor, "keep_original_size", None)
    tiling = None if module.tiling is None else module.tiling.spec
    precision = "32-true" if module._trainer is None else str(module._trainer.precision)
    identity = {**module.architecture, "pre_processing": spec, "precision": precision,
                "keep_original_size": keep_size, "tiling": tiling, "weights": weights, "purpose": purpose,
                "dtype": dtype, "augmentations": None if augmentations is None else repr(augmentations)}  # fmt: skip
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=repr).encode()).hexdigest()


@dataclass
class _Cache:
    """One purpose's store and what decides whether the next stage keeps it (the same on every rank)."""

    purpose: str
    dtype: str
    store: FeatureStore | None = None
    fingerprint: str | None = None  # of the open store, or of the one that could not be opened on this rank
    parked: str | None = None  # a released evaluation folder ("" where this rank had none) to reopen
    active: bool = False
    keys: ImageKeys = field(default_factory=ImageKeys)


def _close(cache: _Cache, directory: Path, keep_parked: bool = False) -> None:
    if (store := cache.store) is not None:
        logger.info("Teacher-feature cache for %s: rank %d: %d images in memory, %d on disk in %s; %d hits, %d misses.",
                    cache.purpose, store.rank, len(store.memory), len(store.spill.entries), store.folder.path,
                    store.hits, store.misses)  # fmt: skip
        store.close()
    if cache.parked and not keep_parked:
        with contextlib.suppress(OSError):
            root = CacheRoot(directory, create=False)
            root.remove_if_unused(cache.parked)
            root.close()
    cache.store, cache.active = None, False
    if not keep_parked:
        cache.fingerprint = cache.parked = None


def _close_all(caches: dict[str, _Cache], directory: Path) -> None:
    for cache in caches.values():
        _close(cache, directory)


class FeatureCacheCallback(Callback):
    """The model's training and evaluation stores; the model asks :meth:`tokens` for each batch's tokens.

    The model returns it from ``configure_callbacks`` and must offer ``model.teacher`` (with its ``backbone``),
    ``architecture``, ``pre_processor``, ``tiling`` and ``load_teacher_weights()``.

    Example:
        >>> import torch
        >>> teacher, off = lambda x: (x.flatten(2).mT, x.flatten(2).mT), CacheSettings(enabled=False)
        >>> FeatureCacheCallback(off).tokens("training", torch.zeros(2, 3, 4, 4), None, teacher)[0].shape
        torch.Size([2, 16, 3])
    """

    def __init__(self, settings: CacheSettings | None = None, memo: DigestMemo | None = None) -> None:
        self.settings = settings or CacheSettings()
        self.memo = memo or DigestMemo()
        self._caches = {
            "training": _Cache("training", self.settings.dtype),
            "evaluation": _Cache("evaluation", "float32"),
        }
        self._off = False  # the folder failed at rank 0 (one warning): no store until the next fit
        self._noted: set[str] = set()
        weakref.finalize(self, _close_all, self._caches, self.settings.directory)

    def __getstate__(self) -> dict[str, Any]:  # pickled (anomalib's to_torch) and copied without open stores
        return {"settings": self.settings, "memo": self.memo}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _wanted(self, trainer: Trainer, stage: str, purpose: str) -> tuple[bool, object]:
        if self.settings.enabled is False or self._off or stage not in PURPOSE_STAGES[purpose]:
            return False, None
        augmentations = stage_augmentations(trainer, stage)
        if augmentations is not None and stage not in self._noted:
            self._noted.add(stage)
            auto = self.settings.enabled is None
            (logger.info if auto else logger.warning)(
                "Teacher-feature cache off for %s: its images are augmented (%s). Set feature_cache.enabled=True "
                "to cache the first version anyway."
                if auto
                else "feature_cache=True with %s-time augmentation (%s): each image's teacher features come from its "
                "first augmented version.",
                stage,
                augmentations,
            )
        return augmentations is None or self.settings.enabled is True, augmentations

    def _start(self, trainer: Trainer, cache: _Cache, parked: str | None) -> FeatureStore | None:
        """Rank 0 reopens ``parked`` or makes a run folder and broadcasts its name; every rank opens its store."""
        directory, about = self.settings.directory, {"purpose": cache.purpose, "fingerprint": cache.fingerprint}
        name, root, folder, failure = None, None, None, None
        if trainer.global_rank == 0:
            try:
                root = CacheRoot(directory)
                if parked:
                    try:
                        folder = RunFolder(root, parked, about, create=False)
                    except OSError:
                        logger.info("Teacher-feature cache: folder %s is gone; recomputing its features.", parked)
                folder = folder or root.create_run(about)
                name = folder.name
            except OSError as error:
                failure = error
        name = trainer.strategy.broadcast(name, src=0)
        try:
            if name is None:
                self._off = True  # on every rank alike, so that all ranks keep calling broadcast together
                if failure is None:
                    return None
                raise failure
            if folder is None:
                root = CacheRoot(directory)
                folder = RunFolder(root, name, about, create=False)
            budgets = self._memory_mb(trainer), self.settings.disk_budget_mb
            return FeatureStore(root, folder, trainer.global_rank, cache.dtype, *budgets)
        except (OSError, DamagedSpillFile) as error:
            logger.warning(
                "Teacher-feature cache off for this run: its folder '%s' cannot be used (%s). Training and evaluation "
                "go on without it, with the same results. Point feature_cache.dir (--model.feature_cache.dir) to a "
                "folder of your own, or set feature_cache=False.",
                directory,
                error,
            )
            if isinstance(folder, RunFolder):
                folder.remove() if trainer.global_rank == 0 and not parked else folder.release()
            if root is not None:
                root.close()
            return None

    def _memory_mb(self, trainer: Trainer) -> float:
        # In DDP entries go to disk, where every rank of the machine finds them (Lightning reshuffles shards).
        return 0.0 if trainer.world_size > 1 else self.settings.memory_budget_mb

    def open_stage(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        """Keep, reopen, open or bypass the store that serves ``stage`` (``fit``: training; else evaluation)."""
        module.load_teacher_weights()
        cache = self._caches["training" if stage == "fit" else "evaluation"]
        cache.active = False
        wanted, augmentations = self._wanted(trainer, stage, cache.purpose)
        if not wanted:
            return
        digest = self.memo({TEACHER_PREFIX + k: v for k, v in module.model.teacher.backbone.state_dict().items()})
        fingerprint = feature_fingerprint(module, digest, cache.purpose, cache.dtype, augmentations)
        if cache.fingerprint != fingerprint or cache.parked is not None:
            parked = cache.parked if cache.fingerprint == fingerprint else None
            _close(cache, self.settings.directory, keep_parked=parked is not None)
            cache.fingerprint, cache.parked, cache.keys = fingerprint, None, ImageKeys()
            cache.store = self._start(trainer, cache, parked)
        if cache.store is not None:
            if cache.purpose == "evaluation":
                training = self._caches["training"].store
                budget = self._memory_mb(trainer) * 2**20
                used = 0 if training is None else training.memory_bytes
                cache.store.memory_budget_bytes = max(int(budget) - used, cache.store.memory_bytes, 0)
            cache.active = True

    def tokens(
        self,
        purpose: str,
        images: torch.Tensor,
        paths: Sequence[str] | None,
        teacher: Teacher,
        tiles_per_image: int = 1,
        tiles: range | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shallow and deep tokens of a batch: stored where the ``purpose``'s store holds them, else ``teacher``'s.

        With ``tiles_per_image`` above 1 the batch holds each image's tiles in a row; ``tiles`` says which of the
        batch's entries ``images`` holds (a chunk), ``None``: all. Without ``paths`` nothing is cached.
        """
        cache = self._caches[purpose]
        if cache.store is None or not cache.active or not paths:
            return teacher(images)
        keys = [None if path is None else cache.keys(path) for path in paths]
        if tiles_per_image > 1:  # one key per tile, an image's tiles in a row
            keys = [None if key is None else f"{key}/{tile}" for key in keys for tile in range(tiles_per_image)]
        return cache.store.tokens(keys if tiles is None else keys[tiles.start : tiles.stop], images, teacher)

    def _park(self, cache: _Cache) -> None:
        """Move the evaluation entries to disk and release memory and folder, for the test that may follow."""
        if cache.fingerprint is None:
            return
        cache.parked = ""
        if cache.store is not None:
            cache.store.flush()
            cache.parked = cache.store.folder.name
            cache.store.close(remove=False)
        cache.store, cache.active = None, False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the training store (the teacher holds its weights by now)."""
        self._off = False
        self.open_stage(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep or open the evaluation store (the features of the fit's earlier validations)."""
        self.open_stage(trainer, pl_module, "validate")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Reopen or open the evaluation store (the features of the fit's validations)."""
        self.open_stage(trainer, pl_module, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Predict batches are not cached."""
        self.open_stage(trainer, pl_module, "predict")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """After a fit or validation: training store removed, evaluation store parked; after a test: removed."""
        _close(self._caches["training"], self.settings.directory)
        if stage in ("fit", "validate"):
            self._park(self._caches["evaluation"])
        elif stage == "test":
            _close(self._caches["evaluation"], self.settings.directory)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A failed run: both stores removed, their locks and memory released."""
        del exception
        _close_all(self._caches, self.settings.directory)
