"""The feature caches' life in a run, as a Lightning callback: opened when a stage starts, always closed.

:class:`FeatureCaching` opens the training cache when training starts and closes it when training
ends; it opens (or keeps) the evaluation cache when a validation or test starts and closes it when
the test ends. When a fit, validation or test fails, Lightning skips the module's end hooks but
calls the callbacks' ``on_exception``: both caches are closed there, so their locks and memory are
never left behind for the next run in the same process (a notebook, a benchmark loop). A callback,
not a module mixin, because only callbacks hear of exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch import Callback

from .dtypes import CACHE_DTYPES
from .settings import one_of
from .teacher_checkpoint import TEACHER_PREFIX
from .teacher_features import PURPOSE_STAGES, CachedTeacherFeatures, pre_processing_spec
from .weights_digest import DigestMemo

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from torch import nn


# The cache options' flat names before they became a group (checkpoints of those versions hold them).
FLAT_NAMES = {
    "cache_dir": "dir",
    "cache_dtype": "dtype",
    "cache_memory_budget_mb": "memory_budget_mb",
    "cache_disk_budget_mb": "disk_budget_mb",
    "cache_shared": "shared",
}


@dataclass(frozen=True)
class FeatureCacheSettings:
    """The teacher-feature caches' options (``TransformerStudent``'s ``feature_cache``).

    On the anomalib CLI ``--model.feature_cache.dtype float32`` or ``--model.feature_cache false``; in
    YAML ``feature_cache: {memory_budget_mb: 0}``; in Python ``feature_cache=FeatureCacheSettings(...)``,
    a dict of its options, or ``True``/``False``/``None`` for ``enabled`` alone.

    Args:
        enabled: ``None`` (default) caches unless the stage's images are augmented; ``True`` caches
            even then (each image's first augmented version); ``False`` never.
        dir: Folder of the disk part; default ``~/.cache/anomalib_transformer_student/teacher_features``,
            private to the user. A folder that cannot be used turns caching off for the run, with one
            warning naming it.
        dtype: Storage of training features, ``"float16"`` (half the memory) or ``"float32"`` (exact);
            evaluation features are always float32.
        memory_budget_mb: Memory for cached features per process (both caches); beyond it they go to disk,
            where later runs with the same features find them. ``0`` keeps all on disk.
        disk_budget_mb: Disk for the whole folder (every teacher, size and process); the features used
            least recently by no running process are evicted to make room. See ``transformer-student cache``.
        shared: The folder is shared by a group of users or by several nodes: other users' folders and
            files are accepted and new ones are group-writable (2770, 0660).

    Example:
        >>> FeatureCacheSettings.from_options(False, {}).enabled
        False
        >>> FeatureCacheSettings.from_options({"dtype": "float32"}, {"cache_dir": "/data/cache"})
        FeatureCacheSettings(enabled=None, dir='/data/cache', dtype='float32', memory_budget_mb=4096.0, \
disk_budget_mb=20480.0, shared=False)
    """

    enabled: bool | None = None
    dir: str | None = None
    dtype: Literal["float16", "float32"] = "float16"
    memory_budget_mb: float = 4096.0
    disk_budget_mb: float = 20480.0
    shared: bool = False

    def __post_init__(self) -> None:
        one_of("feature_cache.dtype", self.dtype, CACHE_DTYPES)
        for name in ("memory_budget_mb", "disk_budget_mb"):
            budget = getattr(self, name)
            if isinstance(budget, bool) or not isinstance(budget, int | float) or budget < 0:
                msg = f"feature_cache.{name} must be a number >= 0, got {budget!r}."
                raise ValueError(msg)

    @classmethod
    def from_options(
        cls, value: FeatureCacheSettings | Mapping[str, Any] | bool | None, legacy: MutableMapping[str, Any]
    ) -> FeatureCacheSettings:
        """The settings from ``feature_cache`` (settings, a dict, or ``enabled``) and the flat names in ``legacy``.

        The flat names (``cache_dir``, ``cache_dtype``, ...: see :data:`FLAT_NAMES`), as checkpoints of earlier
        versions hold them, are taken out of ``legacy``; they fill what ``value`` leaves at its default.
        """
        if value is None or isinstance(value, bool):
            value = cls(enabled=value)
        elif isinstance(value, Mapping):
            known = {field.name for field in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                msg = f"feature_cache has no option {unknown}; its options are {sorted(known)}."
                raise ValueError(msg)
            value = cls(**value)
        elif not isinstance(value, cls):
            msg = f"feature_cache must be a FeatureCacheSettings, a dict of its options or a bool, got {value!r}."
            raise TypeError(msg)
        flat = {field: legacy.pop(name) for name, field in FLAT_NAMES.items() if name in legacy}
        defaults = cls()
        flat = {field: option for field, option in flat.items() if getattr(value, field) == getattr(defaults, field)}
        return cls(**{**{field.name: getattr(value, field.name) for field in fields(cls)}, **flat})


class FeatureCaching(Callback):
    """The training and evaluation feature caches of a model (see :mod:`.teacher_features`).

    The model asks :attr:`training` and :attr:`evaluation` for each batch's tokens and returns this
    callback from ``configure_callbacks``. The model must offer ``model.teacher`` (with its
    ``backbone``), ``architecture``, ``pre_processor``, ``tiling`` and
    ``load_teacher_weights()``.

    Args:
        settings: The caches' options (see :class:`FeatureCacheSettings`).
        memo: The model's memo of its teacher's digest (shared with its checkpoints).

    Example:
        >>> caching = FeatureCaching(FeatureCacheSettings(enabled=False))
        >>> caching.training.enabled, caching.evaluation.dtype
        (False, 'float32')
    """

    def __init__(self, settings: FeatureCacheSettings | None = None, memo: DigestMemo | None = None) -> None:
        settings = settings or FeatureCacheSettings()
        common = {
            "enabled": settings.enabled,
            "cache_dir": settings.dir,
            "memory_budget_mb": settings.memory_budget_mb,
            "disk_budget_mb": settings.disk_budget_mb,
            "shared": settings.shared,
        }
        self.training = CachedTeacherFeatures("training", dtype=settings.dtype, **common)
        self.evaluation = CachedTeacherFeatures("evaluation", **common)
        self.memo = memo or DigestMemo()

    def weights_digest(self, teacher: nn.Module) -> str:
        """Digest of the teacher's weights as checkpoints record it (remembered while they are unchanged)."""
        return self.memo({TEACHER_PREFIX + name: value for name, value in teacher.backbone.state_dict().items()})

    @staticmethod
    def feature_identity(module: LightningModule) -> dict[str, Any]:
        """Everything but the weights that shapes the teacher's features of an image (part of the fingerprint)."""
        pre_processor = module.pre_processor
        identity = {
            **module.architecture,
            "pre_processing": pre_processing_spec(pre_processor),
            "precision": "32-true" if module._trainer is None else str(module._trainer.precision),
            "keep_original_size": getattr(pre_processor, "keep_original_size", None),
        }
        if module.tiling is not None:
            identity["tiling"] = module.tiling.spec
        return identity

    def open_stage(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        """Open, keep or bypass the cache that serves ``stage`` (``fit``: training; else evaluation)."""
        module.load_teacher_weights()
        features = self.training if stage == "fit" else self.evaluation
        serves = stage in PURPOSE_STAGES[features.purpose] and features.enabled is not False
        digest = self.weights_digest(module.model.teacher) if serves else ""
        features.open(
            trainer,
            stage,
            digest,
            self.feature_identity(module),
            memory_in_use=0 if stage == "fit" else self.training.memory_bytes,
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the training cache once the teacher holds its weights."""
        self.open_stage(trainer, pl_module, "fit")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report and release the training cache; its disk part stays for later runs."""
        self.training.close(trainer.global_rank)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep or open the evaluation cache (the features of earlier validations of the fit)."""
        self.open_stage(trainer, pl_module, "validate")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep or open the evaluation cache (the features of the fit's validations)."""
        self.open_stage(trainer, pl_module, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Predict batches are not cached (the evaluation cache is bypassed, not closed)."""
        self.open_stage(trainer, pl_module, "predict")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Close the training cache after a fit (if still open) and the evaluation cache after a test."""
        self.training.close(trainer.global_rank)
        if stage == "test":
            self.evaluation.close(trainer.global_rank)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A failed run: close both caches, releasing their locks and memory."""
        del exception
        self.training.close(trainer.global_rank)
        self.evaluation.close(trainer.global_rank)
