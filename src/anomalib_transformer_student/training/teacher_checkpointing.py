"""The checkpoint hooks of a model with a frozen teacher, as one mixin of the Lightning module.

:class:`TeacherCheckpointMixin` owns both checkpoint hooks of the module. It is a mixin, not a
callback, because ``load_from_checkpoint`` runs the module's ``on_load_checkpoint`` but no
callback's (as anomalib's ``MemoryBankMixin`` and ``ExportMixin`` sit among a model's bases):

- saving records the architecture (checked on load, see
  :mod:`~anomalib_transformer_student.training.checkpoint_compat`) and, before the last epoch of a
  fit, leaves the frozen teacher out when its weights can be fetched again (see
  :mod:`~anomalib_transformer_student.training.teacher_checkpoint`);
- loading refuses a checkpoint of another teacher, layers or size, keeps the model's own metrics,
  and puts a left-out teacher back (fetched again, verified by digest);
- :meth:`~TeacherCheckpointMixin.load_teacher_weights` fetches the pretrained weights when a stage
  starts, unless the teacher holds them already (a checkpoint brought them).

The random generators' state travels with checkpoints too, in a callback
(:class:`~anomalib_transformer_student.training.rng_state.RandomGeneratorState`): only a resumed
fit needs it.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch

from .checkpoint_compat import check_checkpoint_compatible, record_architecture, use_current_evaluator
from .teacher_checkpoint import is_final_checkpoint, omit_teacher, restore_teacher
from .teacher_weights import TeacherSource
from .weights_digest import DigestMemo


class TeacherCheckpointMixin:
    """Checkpoint hooks and weight loading of a Lightning module whose ``model.teacher`` is a frozen ViT.

    The module provides ``model.teacher`` (a
    :class:`~anomalib_transformer_student.model.teacher.TeacherFeatureExtractor`), ``teacher_name`` (its
    timm name), ``weights_source`` (a :class:`~.teacher_weights.TeacherSource`, ``None`` for random
    weights) and ``evaluator``; the mixin comes before ``AnomalibModule`` among its bases.
    """

    model: Any
    teacher_name: str
    weights_source: TeacherSource | None

    @property
    def architecture(self) -> dict[str, Any]:
        """What the saved weights mean: the teacher's name, its two blocks (non-negative) and the input size."""
        teacher = self.model.teacher
        return {"teacher": self.teacher_name, "layers": list(teacher.layers), "image_size": teacher.image_size}

    @property
    def teacher_digest_memo(self) -> DigestMemo:
        """The one memo of the frozen teacher's digest (checkpoints, and the feature caches' fingerprints)."""
        return self.__dict__.setdefault("_teacher_digest_memo", DigestMemo())

    def load_teacher_weights(self) -> None:
        """Fetch and load the teacher's pretrained weights unless the teacher already holds them.

        Runs when a stage starts, after any checkpoint restore, so that a checkpoint that holds the
        teacher (the one a fit ends with) loads offline.
        """
        teacher = self.model.teacher
        if not bool(teacher.weights_loaded) and self.weights_source is not None:
            teacher.load_backbone_state_dict(self.weights_source.state_dict())

    def on_fit_start(self) -> None:
        """Load the teacher's weights before training starts."""
        super().on_fit_start()
        self.load_teacher_weights()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also record the architecture (checked on load).

        Before the last epoch of a fit, leave the frozen teacher out when its weights can be fetched again
        (see :mod:`~anomalib_transformer_student.training.teacher_checkpoint`).
        """
        super().on_save_checkpoint(checkpoint)
        record_architecture(checkpoint, self.architecture)
        source = self.weights_source
        if not is_final_checkpoint(self._trainer) and source is not None and source.available():
            # The frozen teacher's digest is hashed once per model (the memo sees whether it changed).
            omit_teacher(checkpoint, source, memo=self.teacher_digest_memo)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Prepare a checkpoint before its state dict loads.

        Refuse one of another teacher, layers or size; keep this model's metrics (evaluator); fetch the
        teacher's weights again for a checkpoint written without them (verified by digest).
        """
        check_checkpoint_compatible(checkpoint, self.architecture, self.model.teacher.depth)
        use_current_evaluator(checkpoint, self.evaluator)
        weights = None if self.weights_source is None else self.weights_source.weights
        restore_teacher(checkpoint, self._reload_teacher, weights, teacher=self.teacher_name)
        super().on_load_checkpoint(checkpoint)

    def _reload_teacher(self, source: TeacherSource) -> dict[str, torch.Tensor]:
        """The backbone's state with the weights of ``source`` (a checkpoint left them out), adapted as loading does.

        They go into a copy of the teacher: the live one gets them only through the checkpoint's state dict,
        after ``restore_teacher`` has verified their digest, so on a mismatch the model keeps its own weights.
        """
        scratch = deepcopy(self.model.teacher)
        scratch.load_backbone_state_dict(source.state_dict())
        return scratch.backbone.state_dict()


__all__ = ["TeacherCheckpointMixin"]
