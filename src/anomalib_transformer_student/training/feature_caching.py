"""The feature caches' life in a run, as a Lightning callback: opened when a stage starts, always closed.

:class:`FeatureCaching` opens the training cache when training starts and closes it when training
ends; it opens (or keeps) the evaluation cache when a validation or test starts and closes it when
the test ends. When a fit, validation or test fails, Lightning skips the module's end hooks but
calls the callbacks' ``on_exception``: both caches are closed there, so their locks and memory are
never left behind for the next run in the same process (a notebook, a benchmark loop). A callback,
not a module mixin, because only callbacks hear of exceptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch import Callback

from .teacher_checkpoint import TEACHER_PREFIX
from .teacher_features import PURPOSE_STAGES, CachedTeacherFeatures
from .weights_digest import DigestMemo

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from torch import nn


class FeatureCaching(Callback):
    """The training and evaluation feature caches of a model (see :mod:`.teacher_features`).

    The model asks :attr:`training` and :attr:`evaluation` for each batch's tokens and returns this
    callback from ``configure_callbacks``. The model must offer ``model.teacher`` (with its
    ``backbone``), ``feature_identity`` and ``load_teacher_weights()``.

    Args:
        enabled: ``None`` (on unless a stage's images are augmented), ``True`` or ``False``.
        cache_dir: Folder of the disk part; default ``~/.cache/anomalib_transformer_student/teacher_features``.
        dtype: Storage dtype of training entries, ``"float16"`` or ``"float32"``.
        memory_budget_mb: Memory for entries per process (both caches together).
        disk_budget_mb: Disk for the whole cache folder.
        shared: The folder is shared by a group of users or nodes.
        memo: The model's memo of its teacher's digest (shared with its checkpoints).

    Example:
        >>> caching = FeatureCaching(enabled=False)
        >>> caching.training.enabled, caching.evaluation.dtype
        (False, 'float32')
    """

    def __init__(
        self,
        enabled: bool | None = None,
        cache_dir: str | Path | None = None,
        dtype: str = "float16",
        memory_budget_mb: float = 4096.0,
        disk_budget_mb: float = 20480.0,
        shared: bool = False,
        memo: DigestMemo | None = None,
    ) -> None:
        settings = {
            "enabled": enabled,
            "cache_dir": cache_dir,
            "memory_budget_mb": memory_budget_mb,
            "disk_budget_mb": disk_budget_mb,
            "shared": shared,
        }
        self.training = CachedTeacherFeatures("training", dtype=dtype, **settings)
        self.evaluation = CachedTeacherFeatures("evaluation", **settings)
        self.memo = memo or DigestMemo()

    def weights_digest(self, teacher: nn.Module) -> str:
        """Digest of the teacher's weights as checkpoints record it (remembered while they are unchanged)."""
        return self.memo({TEACHER_PREFIX + name: value for name, value in teacher.backbone.state_dict().items()})

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
            module.feature_identity,
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
