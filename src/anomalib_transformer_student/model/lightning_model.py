"""TransformerStudent: the Lightning module that anomalib's Engine and CLI drive.

Example:
    Training on MVTec AD (downloads the dataset and the teacher's weights)::

        from anomalib.data import MVTecAD
        from anomalib.engine import Engine
        from anomalib_transformer_student import TransformerStudent

        Engine(max_epochs=50).fit(TransformerStudent(), datamodule=MVTecAD(category="screw", train_batch_size=4))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from anomalib import LearningType
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback

from ..deploy.export import TransformerStudentExportMixin
from ..feature_cache.callback import FeatureCacheCallback
from ..feature_cache.settings import CacheSettings, loading_checkpoint
from ..training.chunked_step import step_in_chunks
from ..training.data_checks import DataChecks
from ..training.finite_features import check_finite_features
from ..training.rng_state import RandomGeneratorState
from ..training.schedule import PaperSchedule
from ..training.teacher_checkpointing import TeacherCheckpointMixin
from ..training.teacher_weights import weights_source
from .anomaly_map import AnomalyMapSettings
from .options import DEFAULT_CACHE, NO_TILING, PAPER_MAP, ModelOptions
from .pre_processing import (
    OriginalSizePreProcessor,
    evaluation_input,
    square_resize_transform,
    training_input,
)
from .precision import emulates_bf16
from .teacher import DEFAULT_TEACHER, build_teacher
from .tiling import Tiling, TilingSettings
from .torch_model import TransformerStudentModel

if TYPE_CHECKING:
    from anomalib.data import Batch, InferenceBatch
    from anomalib.metrics import Evaluator
    from anomalib.post_processing import PostProcessor
    from anomalib.visualization import Visualizer
    from lightning.pytorch.utilities.types import STEP_OUTPUT

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 1036

__all__ = ["TransformerStudent"]


class TransformerStudent(TeacherCheckpointMixin, TransformerStudentExportMixin, AnomalibModule):
    """Learning to Be a Transformer to Pinpoint Anomalies (Costanzino et al., IEEE Access 2025).

    A frozen DINOv2 ViT (the teacher) yields patch tokens at two depths; two shallow MLPs (the
    students), trained on nominal images only, learn to map each depth to the other. Where they
    fail, the image is anomalous. The teacher runs once per image, so the model affords the
    paper's high resolution (1036 px, 74 x 74 patches) that lets it see tiny defects.

    The teacher's weights are fetched when a stage starts, not at construction, so the checkpoint a fit
    ends with (which holds the teacher) loads offline; those of earlier epochs leave the frozen teacher out when
    it can be fetched again. Every option: ``docs/reference/options.md``.

    Args:
        teacher: timm name of the Vision Transformer teacher.
        pretrained: Load the teacher's pretrained weights; ``False`` keeps random ones (tests only).
        teacher_weights: ``None`` for timm's weights (Hugging Face Hub or its cache), or a local file in
            timm's or the official DINOv2/DINOv3 layout.
        layers: Two block indices ``(shallow, deep)``, negative from the end; ``None``: the paper's choice
            carried to the depth, (7, 11) for 12 blocks (:func:`~.teacher.default_layers`).
        image_size: Side of the square model input, a multiple of the teacher's patch size (14 or 16).
        lr: Adam learning rate of the students (the reference code's 1e-4; the paper's text says 1e-3).
        max_epochs: Epochs imposed on the trainer; ``None`` leaves ``--trainer.max_epochs``, else the
            paper's 50 (see :mod:`~anomalib_transformer_student.training.schedule`).
        anomaly_map: The map smoothing and the image score (:class:`AnomalyMapSettings`, or a dict of its
            options: ``blur_kernel_sizes``, ``blur_repeats``, ``topk_ratio``); the paper's by default.
        tiling: Inspect large images tile by tile (:class:`TilingSettings`, or a dict of its options:
            ``tile_size``, ``tile_overlap``, ``tile_batch_size``); by default each image goes whole.
        feature_cache: The teacher-feature caches (:class:`CacheSettings`, a dict of its options, or a
            bool for ``enabled``): by default each image's teacher features are computed once per fit. A
            checkpoint keeps only ``enabled`` and ``dtype``; folder and budgets are the loading machine's.
        full_resolution_maps: Return each map at its image's original size (padding cropped away), as the
            paper evaluates; applies to the default pre-processor.
        pre_processor: Pre-processor, or ``True`` for square edge-pad, bicubic resize to
            ``image_size`` and ImageNet normalisation (:class:`OriginalSizePreProcessor`).
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for anomalib's default metrics.
        visualizer: Visualizer, or ``True`` for anomalib's default.
        **dotted_options: Options of the groups under dotted names (``tiling.tile_size=518``), as
            ``get_model`` passes a jsonargparse ``Namespace``: merged into their groups (see :mod:`.options`).

    Precision is the trainer's: ``--trainer.precision bf16-mixed`` (``Engine(precision="bf16-mixed")``) runs
    teacher and students in bf16 in every stage, the loss and the map maths in float32; exports stay float32.
    On a CPU without bf16 units the model runs float32 instead, with one warning.

    Corrupt images stop a stage with ``CorruptImageError`` naming them; to skip them instead, give the trainer
    ``DataChecks(skip_corrupt_images=True)`` (``--trainer.callbacks`` on the CLI, ``Engine(callbacks=[...])``).

    Example:
        >>> from anomalib_transformer_student import TransformerStudent
        >>> model = TransformerStudent(pretrained=False, image_size=224)
        >>> model.model.teacher.grid_size
        (16, 16)
    """

    def __init__(
        self,
        teacher: str = DEFAULT_TEACHER,
        pretrained: bool = True,
        teacher_weights: str | None = None,
        layers: Sequence[int] | None = None,
        image_size: int = DEFAULT_IMAGE_SIZE,
        lr: float = 1e-4,
        max_epochs: int | None = None,
        anomaly_map: AnomalyMapSettings = PAPER_MAP,
        tiling: TilingSettings = NO_TILING,
        feature_cache: CacheSettings | bool | None = DEFAULT_CACHE,
        full_resolution_maps: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        **dotted_options: Any,
    ) -> None:
        options = ModelOptions.from_arguments(anomaly_map, tiling, feature_cache, dotted_options)
        # AnomalibModule saves the constructor's locals as hyper-parameters: the groups, as plain data, and only them.
        anomaly_map, tiling, feature_cache = options.hyperparameters()
        dotted_options = {}
        super().__init__(
            pre_processor=False if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.teacher_name = teacher
        self.weights_source = weights_source(teacher, pretrained, teacher_weights)
        self.lr = lr
        self.max_epochs = max_epochs
        self._bf16_fallback_noted = False
        feature_extractor = build_teacher(teacher, layers, image_size, pretrained)
        geometry = options.tiling.geometry(
            feature_extractor.image_size, feature_extractor.patch_size, pre_processor is True, full_resolution_maps
        )
        self.model = TransformerStudentModel(
            feature_extractor,
            **anomaly_map,
            teacher_batch_size=None if geometry is None else options.tiling.tile_batch_size,
        )
        if pre_processor is True:
            self.pre_processor = self.configure_pre_processor((image_size, image_size), full_resolution_maps, geometry)
        elif full_resolution_maps and pre_processor is not False:
            logger.info(
                "full_resolution_maps applies to the default pre-processor; with a custom one, maps come at the "
                "size the pre-processor gives, in evaluation and in exported models alike."
            )
        if geometry is not None:  # tiles step chunk by chunk (see training_step)
            self.automatic_optimization = False
        self.feature_caching = FeatureCacheCallback(options.feature_cache, memo=self.teacher_digest_memo)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> TransformerStudent:
        """Lightning's loader; of a checkpoint's ``feature_cache`` only ``enabled`` and ``dtype`` are taken.

        A checkpoint describes the model, not the machine: the cache folder and budgets are this machine's
        defaults, or what ``feature_cache=`` says.
        """
        if "feature_cache" in kwargs:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        with loading_checkpoint():
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on nominal images only."""
        return LearningType.ONE_CLASS

    @classmethod
    def configure_pre_processor(
        cls, image_size: tuple[int, int] | None = None, keep_original_size: bool = True, tiling: Tiling | None = None
    ) -> PreProcessor:
        """Square edge-pad, bicubic resize to ``image_size`` (default 1036 x 1036), ImageNet normalisation.

        With ``keep_original_size`` evaluation batches stay at their original size (see
        :class:`OriginalSizePreProcessor`); with ``tiling`` images larger than a tile are tiled.
        """
        side = (image_size or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))[0]
        return OriginalSizePreProcessor(
            square_resize_transform(side), keep_original_size=keep_original_size, tiling=tiling
        )

    def configure_callbacks(self) -> list[Callback]:
        """Anomalib's component callbacks; checks of every image and mask; the paper's schedule; the RNG state.

        Lightning replaces a trainer's callbacks of these types by the module's, so the module's ``DataChecks``
        adopts the ``skip_corrupt_images`` of one given to the trainer. The other two have no settings to lose.
        """
        teacher = self.model.teacher
        trainer_callbacks = self._trainer.callbacks if self._trainer is not None else []
        skip = any(isinstance(callback, DataChecks) and callback.skip_corrupt_images for callback in trainer_callbacks)
        checks = DataChecks(skip, input_size=teacher.image_size, patch_size=teacher.patch_size, tiling=self.tiling)
        return [*super().configure_callbacks(), checks, PaperSchedule(), RandomGeneratorState(), self.feature_caching]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over both students; the teacher is frozen.

        On CPU and CUDA the fused implementation updates all parameters in one kernel, several
        times faster than the default; with cached teacher features the update is a visible
        part of a training step.
        """
        students = chain(self.model.forward_student.parameters(), self.model.backward_student.parameters())
        return torch.optim.Adam(students, lr=self.lr, fused=self.device.type in {"cpu", "cuda"})

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Only ``max_epochs`` when the constructor was given one (without, see :class:`PaperSchedule`)."""
        return {} if self.max_epochs is None else {"max_epochs": self.max_epochs}

    @property
    def tiling(self) -> Tiling | None:
        """The tiling of large images, or ``None`` when each image is inspected whole."""
        return getattr(self.pre_processor, "tiling", None)

    def training_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        """Cosine loss of both students on a batch of nominal images (teacher tokens from the cache if on).

        With tiling, the tiles pass through teacher and students ``tile_batch_size`` at a time, with one
        optimiser step per batch (:func:`~..training.chunked_step.step_in_chunks`).
        """
        del args, kwargs
        with self._precision():
            images, tiles = training_input(self.pre_processor, batch.image)
            if self.automatic_optimization:
                loss = self._student_loss(batch_idx, images, batch.image_path, tiles)
            else:
                paths = batch.image_path
                loss = step_in_chunks(
                    self,
                    len(images),
                    self.model.teacher_batch_size,
                    lambda part: self._student_loss(batch_idx, images[part.start : part.stop], paths, tiles, part),
                )
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.image))
        return {"loss": loss}

    def _student_loss(
        self, batch_idx: int, images: torch.Tensor, paths: Sequence[str] | None, tiles: int, part: range | None = None
    ) -> torch.Tensor:
        """The students' loss on ``images``: the batch's entries (tiles) ``part``, or all of them."""
        teacher = self.model.teacher_features
        shallow, deep = self.feature_caching.tokens("training", images, paths, teacher, tiles, part)
        if batch_idx == 0:  # NaN from a broken teacher must not train 50 epochs: checked once per epoch
            check_finite_features(
                shallow,
                deep,
                images=images,
                teacher=self.model.teacher,
                precision=self.trainer.precision,
                weights_source=None if self.weights_source is None else self.weights_source.name,
            )
        return self.model.student_loss(shallow, deep)

    def _precision(self) -> contextlib.AbstractContextManager:
        """The trainer's autocast as it is, or float32 where bf16 would only be emulated (one warning per model)."""
        if self._trainer is None or not emulates_bf16(self._trainer.precision, self.device):
            return contextlib.nullcontext()
        if not self._bf16_fallback_noted:
            self._bf16_fallback_noted = True
            logger.warning(
                "precision=%s: this CPU has no bf16 units (AVX512_BF16 or AMX-BF16 on x86, BF16 on Arm), on which "
                "PyTorch emulates bfloat16 several times slower than float32, so the model runs in float32. Pass "
                "--trainer.precision 32-true (Engine(precision='32-true')) to silence this.",
                self._trainer.precision,
            )
        return torch.autocast("cpu", enabled=False)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps (at the original size with ``full_resolution_maps``) and scores of evaluation images."""
        del args, kwargs
        with self._precision():
            return batch.update(**self._predict(batch.image, batch.image_path)._asdict())

    test_step = predict_step = validation_step

    def _predict(self, images: torch.Tensor, paths: Sequence[str] | None = None) -> InferenceBatch:
        """Predictions for evaluation images as the steps receive them (after the pre-processor's hooks).

        The teacher's tokens come from the evaluation-feature cache where it holds them (``paths``
        name the images); ``forward``, the export path, never uses it.
        """
        model_input, placement = evaluation_input(self.pre_processor, images, pre_processed=True)
        teacher = self.model.teacher_features
        layout = placement.get("layout")
        if layout is not None:  # tiles chunk by chunk: only one chunk's tokens alive, only the scores kept
            return self.model.predict_in_chunks(
                model_input,
                layout,
                lambda part, chunk: self.feature_caching.tokens(
                    "evaluation", chunk, paths, teacher, layout.count, part
                ),
            )
        shallow, deep = self.feature_caching.tokens("evaluation", model_input, paths, teacher)
        return self.model.predict(shallow, deep, tuple(model_input.shape[-2:]), **placement)

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch:
        """Pre-process, predict and post-process raw images, as exported models do."""
        del args, kwargs
        model_input, placement = evaluation_input(self.pre_processor, batch, pre_processed=False)
        predictions = self.model(model_input, **placement)
        return self.post_processor(predictions) if self.post_processor else predictions
