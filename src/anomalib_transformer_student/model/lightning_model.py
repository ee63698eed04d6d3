"""TransformerStudent: the Lightning module that anomalib's Engine and CLI drive.

Example:
    Training on MVTec AD (downloads the dataset and the teacher's weights)::

        from anomalib.data import MVTecAD
        from anomalib.engine import Engine
        from anomalib_transformer_student import TransformerStudent

        Engine(max_epochs=50).fit(TransformerStudent(), datamodule=MVTecAD(category="screw", train_batch_size=4))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

import torch
from anomalib import LearningType
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback

from ..deploy.export import TransformerStudentExportMixin
from ..training.data_checks import DataChecks
from ..training.evaluation_features import EvaluationFeatures
from ..training.finite_features import FiniteFeaturesMixin
from ..training.rng_state import RandomGeneratorState
from ..training.schedule import PaperSchedule
from ..training.teacher_checkpointing import TeacherCheckpointMixin
from ..training.teacher_weights import weights_source
from ..training.training_features import TrainingFeatures, pre_processing_spec
from .pre_processing import (
    OriginalSizePreProcessor,
    evaluation_input,
    square_resize_transform,
    tiles_per_image,
    training_input,
)
from .teacher import DEFAULT_TEACHER, TeacherFeatureExtractor, create_backbone
from .tiling import Tiling
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


def _positive_count(name: str, value: int) -> int:
    """``value`` if it is a positive integer, else a ``ValueError`` naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be a positive integer, got {value!r}; e.g. {name}=8."
        raise ValueError(msg)
    return value


class TransformerStudent(TeacherCheckpointMixin, FiniteFeaturesMixin, TransformerStudentExportMixin, AnomalibModule):
    """Learning to Be a Transformer to Pinpoint Anomalies (Costanzino et al., IEEE Access 2025).

    A frozen DINOv2 ViT (the teacher) yields patch tokens at two depths; two shallow MLPs (the
    students), trained on nominal images only, learn to map each depth to the other. Where they
    fail, the image is anomalous. The teacher runs once per image, so the model affords the
    paper's high resolution (1036 px, 74 x 74 patches) that lets it see tiny defects.

    The teacher's pretrained weights are fetched when training (or testing an untrained model)
    starts, not at construction, so that the checkpoint a fit ends with, which holds the teacher,
    loads offline. Checkpoints written before the last epoch leave the frozen teacher out when its
    weights can be fetched again (a ``teacher_weights`` file, or timm's weights in the Hugging Face
    cache), and fetch them on load.

    Args:
        teacher: timm name of the Vision Transformer teacher.
        pretrained: Load the teacher's pretrained weights; ``False`` keeps random weights
            (tests and experiments only).
        teacher_weights: Where the pretrained weights come from: ``None`` for timm's weights via
            the Hugging Face Hub or its local cache (``HF_HUB_OFFLINE=1`` works once cached), or
            the path of a local file in timm's layout (``.safetensors``, ``.pth``, ``.bin``) or
            in the official DINOv2 torch.hub layout (e.g. ``dinov2_vitb14_reg4_pretrain.pth``).
        layers: Two block indices ``(shallow, deep)``; negative indices count from the end. ``None``
            (default) takes the paper's choice carried to the teacher's depth: the block at two thirds
            of the depth and the last block, (7, 11) for 12 blocks, (15, 23) for 24
            (:func:`~anomalib_transformer_student.model.teacher.default_layers`).
        image_size: Side of the square model input in pixels; a multiple of the teacher's patch
            size (14 for DINOv2, 16 for DINOv3), else construction fails naming the nearest valid sizes.
        lr: Adam learning rate of the students (the reference code uses 1e-4; the paper's text
            mentions 1e-3).
        blur_kernel_sizes: Odd box-filter sizes of the map smoothing stages.
        blur_repeats: How often each smoothing stage is applied.
        topk_ratio: Fraction of map pixels whose mean is the image score.
        max_epochs: Epochs to train, imposed on the trainer (anomalib's benchmark pipeline gives
            the trainer no options). ``None`` (default) leaves the trainer's own setting
            (``--trainer.max_epochs``), and without one the paper's 50 epochs, not Lightning's
            1000 (see :mod:`~anomalib_transformer_student.training.schedule`).
        feature_cache: Cache the teacher's features of each training image after the first
            epoch, so that later epochs run only the students. ``None`` (default) turns it on
            unless the datamodule applies train-time augmentation; ``True`` keeps it on even
            then (each image's features come from its first augmented version). The same switch
            governs the evaluation-feature cache: each validation and test image's features
            (float32, exact) come from its first validation and serve every later validation of
            the fit and the test after it (see
            :mod:`~anomalib_transformer_student.training.evaluation_features`); ``None`` leaves
            it on unless the evaluation images themselves are augmented; ``False`` turns both
            off. Predict is never cached.
        cache_dir: Folder of the cache's disk part (entries beyond the memory budget);
            default ``~/.cache/anomalib_transformer_student/teacher_features``. Must be
            writable, else training stops before it starts.
        cache_dtype: Storage dtype of cached features: ``"float16"`` (default, half the
            memory) or ``"float32"`` (exact).
        cache_memory_budget_mb: Memory for cached features per process; beyond it they go to
            a file in ``cache_dir``, which later runs with the same teacher, weights, layers,
            image size and pre-processing reuse. ``0`` keeps all on disk.
        cache_disk_budget_mb: Disk for the cache's files in ``cache_dir`` per teacher, weights,
            layers, image size and pre-processing, all categories and processes together
            (default 20 GiB); beyond it further images are not cached (one warning naming the
            folder). A full disk does not stop training either: caching stops, with one warning.
        full_resolution_maps: At validation, test and predict, return each anomaly map at its
            image's original size (upsampled to the square-padded original size, padding
            cropped away), with ``gt_mask`` left at full resolution, as the paper evaluates.
            Applies to the default pre-processor; with a custom one, maps come at the size it
            gives, in evaluation and in exported models alike.
        teacher_precision: ``"float32"`` (default, faithful to the reference), or
            ``"float16"``/``"bfloat16"`` to run the teacher under autocast (training's teacher pass,
            validation, test, predict): on CUDA both; on CPUs ``"bfloat16"`` where the CPU has bf16
            units (AVX512_BF16 or AMX on x86, BF16 on Arm), else float32 with one warning. Exported
            graphs hold the float32 teacher; their runtime chooses the precision.
        tile_size: Inspect large images tile by tile: the side of a tile in pixels of the original
            image, each tile resized to ``image_size`` for the teacher (``tile_size == image_size``
            is native resolution; larger tiles trade resolution for speed). A multiple of the
            teacher's patch grid (``image_size / 14`` for DINOv2, e.g. 74 at 1036 px). Images that fit
            in one tile go whole, as without tiling; the tiles' patch scores make one patch map of
            the image, upsampled and smoothed once at full resolution (see
            :mod:`~anomalib_transformer_student.model.tiling`). At most
            ``MAX_TILES_PER_IMAGE`` (256) tiles per image. In training every tile of every image
            trains the students (the teacher takes them ``tile_batch_size`` at a time). ``None``
            (default) inspects each image whole. Needs the default pre-processor and
            ``full_resolution_maps``.
        tile_overlap: Pixels of the original image that neighbouring tiles share at least (rounded
            up to whole patches); tiles are spread evenly to cover the image, so they often share
            more. Where tiles overlap, their patch scores are averaged.
        tile_batch_size: Most tiles the teacher takes at once in training and evaluation (a batch's
            tiles run in chunks of this size): bounds the teacher's memory, and on CPUs keeps the
            cost per tile that of a small batch. Exported graphs run all tiles of a batch at once.
        skip_corrupt_images: Drop images (and masks) that cannot be decoded, with one warning
            listing them, instead of stopping with ``CorruptImageError`` (every image and mask is
            checked before a stage starts; see :class:`DataChecks`).
        pre_processor: Pre-processor, or ``True`` for square edge-pad, bicubic resize to
            ``image_size`` and ImageNet normalisation (:class:`OriginalSizePreProcessor`).
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for anomalib's default metrics.
        visualizer: Visualizer, or ``True`` for anomalib's default.

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
        blur_kernel_sizes: Sequence[int] = (5, 7),
        blur_repeats: Sequence[int] = (5, 3),
        topk_ratio: float = 0.001,
        max_epochs: int | None = None,
        feature_cache: bool | None = None,
        cache_dir: str | None = None,
        cache_dtype: Literal["float16", "float32"] = "float16",
        cache_memory_budget_mb: float = 4096.0,
        cache_disk_budget_mb: float = 20480.0,
        full_resolution_maps: bool = True,
        teacher_precision: Literal["float32", "float16", "bfloat16"] = "float32",
        skip_corrupt_images: bool = False,
        tile_size: int | None = None,
        tile_overlap: int = 0,
        tile_batch_size: int = 8,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
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
        self.skip_corrupt_images = skip_corrupt_images
        feature_extractor = TeacherFeatureExtractor(create_backbone(teacher), layers, image_size)
        if not pretrained:
            logger.warning(
                "Teacher '%s' keeps random weights (pretrained=False): fine for tests, meaningless for inspection.",
                teacher,
            )
            feature_extractor.weights_loaded.fill_(True)
        self.model = TransformerStudentModel(
            feature_extractor, blur_kernel_sizes, blur_repeats, topk_ratio, teacher_precision=teacher_precision
        )
        tiling = self._tiling(tile_size, tile_overlap, pre_processor, full_resolution_maps)
        if tiling is not None:
            self.model.teacher_batch_size = _positive_count("tile_batch_size", tile_batch_size)
        if pre_processor is True:
            self.pre_processor = self.configure_pre_processor((image_size, image_size), full_resolution_maps, tiling)
        elif full_resolution_maps and pre_processor is not False:
            logger.info(
                "full_resolution_maps applies to the default pre-processor; with a custom one, maps come at the "
                "size the pre-processor gives, in evaluation and in exported models alike."
            )
        self.training_features = TrainingFeatures(
            feature_cache, cache_dir, cache_dtype, cache_memory_budget_mb, cache_disk_budget_mb
        )
        self.evaluation_features = EvaluationFeatures(
            feature_cache, cache_dir, cache_memory_budget_mb, cache_disk_budget_mb
        )

    def _tiling(
        self, tile_size: int | None, tile_overlap: int, pre_processor: PreProcessor | bool, full_resolution_maps: bool
    ) -> Tiling | None:
        """The tiling that ``tile_size`` and ``tile_overlap`` ask for, checked against the other settings."""
        if tile_size is None:
            if tile_overlap:
                msg = f"tile_overlap={tile_overlap} applies to tiles only: set tile_size too, or drop tile_overlap."
                raise ValueError(msg)
            return None
        if pre_processor is not True:
            msg = (
                f"tile_size={tile_size} needs the model's own pre-processor, which tiles images at their original "
                "size: drop the custom pre_processor, or drop tile_size."
            )
            raise ValueError(msg)
        if not full_resolution_maps:
            msg = (
                f"tile_size={tile_size} returns maps at each image's own size: it needs full_resolution_maps=True "
                "(the default)."
            )
            raise ValueError(msg)
        teacher = self.model.teacher
        tiling = Tiling(tile_size, tile_overlap, image_size=teacher.image_size, patch_size=teacher.patch_size)
        logger.info(
            "Images larger than %d x %d px are inspected in %d-px tiles, each resized to %d px for the teacher "
            "(neighbours share at least %d px; at most %d tiles per image).",
            tile_size,
            tile_size,
            tile_size,
            teacher.image_size,
            tiling.overlap,
            tiling.max_tiles,
        )
        return tiling

    @property
    def tiling(self) -> Tiling | None:
        """The tiling of large images, or ``None`` when each image is inspected whole."""
        return getattr(self.pre_processor, "tiling", None)

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
        adopts a trainer's ``skip_corrupt_images``: corrupt images are skipped when either asks for it. The
        other two have no settings to lose.
        """
        teacher = self.model.teacher
        trainer_callbacks = self._trainer.callbacks if self._trainer is not None else []
        skip = self.skip_corrupt_images or any(
            isinstance(callback, DataChecks) and callback.skip_corrupt_images for callback in trainer_callbacks
        )
        checks = DataChecks(skip, input_size=teacher.image_size, patch_size=teacher.patch_size, tiling=self.tiling)
        return [*super().configure_callbacks(), checks, PaperSchedule(), RandomGeneratorState()]

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

    def training_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        """Cosine loss of both students on a batch of nominal images (teacher tokens from the cache if on)."""
        del args, kwargs
        images, tiles = training_input(self.pre_processor, batch.image)
        shallow, deep = self.training_features.tokens(images, batch.image_path, self.model.teacher_features, tiles)
        self.check_features(batch_idx, shallow, deep, images)  # NaN from a broken teacher must not train 50 epochs
        loss = self.model.student_loss(shallow, deep)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.image))
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps (at the original size with ``full_resolution_maps``) and scores of evaluation images."""
        del args, kwargs
        return batch.update(**self._predict(batch.image, batch.image_path)._asdict())

    test_step = predict_step = validation_step

    def _predict(self, images: torch.Tensor, paths: Sequence[str] | None = None) -> InferenceBatch:
        """Predictions for evaluation images as the steps receive them (after the pre-processor's hooks).

        The teacher's tokens come from the evaluation-feature cache where it holds them (``paths``
        name the images); ``forward``, the export path, never uses it.
        """
        model_input, placement = evaluation_input(self.pre_processor, images, pre_processed=True)
        shallow, deep = self.evaluation_features.tokens(
            model_input, paths, self.model.teacher_features, tiles_per_image(placement)
        )
        return self.model.predict(shallow, deep, tuple(model_input.shape[-2:]), **placement)

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch:
        """Pre-process, predict and post-process raw images, as exported models do."""
        del args, kwargs
        model_input, placement = evaluation_input(self.pre_processor, batch, pre_processed=False)
        predictions = self.model(model_input, **placement)
        return self.post_processor(predictions) if self.post_processor else predictions

    @property
    def feature_identity(self) -> dict[str, Any]:
        """Everything but the weights that shapes the teacher's features of an image (for the cache's key)."""
        identity = {
            **self.architecture,
            "pre_processing": pre_processing_spec(self.pre_processor),
            "teacher_precision": self.model.teacher_precision,
        }
        if self.tiling is not None:
            identity["tiling"] = self.tiling.spec
        return identity

    def on_train_start(self) -> None:
        """Open the teacher-feature cache once the teacher holds its weights (see ``feature_cache``)."""
        self.training_features.open(self.trainer, self.model.teacher, self.feature_identity)

    def on_train_end(self) -> None:
        """Report and release the teacher-feature cache; its disk part stays for later runs."""
        self.training_features.close(self.global_rank)

    def _start_evaluation(self, stage: str) -> None:
        """Load the teacher's weights, then keep or open the evaluation-feature cache for ``stage``."""
        self.load_teacher_weights()
        training_cache = self.training_features.cache
        self.evaluation_features.open(
            self.trainer,
            stage,
            self.model.teacher,
            {**self.feature_identity, "keep_original_size": getattr(self.pre_processor, "keep_original_size", None)},
            memory_in_use=0 if training_cache is None else training_cache.memory_bytes,
        )

    def on_validation_start(self) -> None:
        """Load the teacher's weights; reuse the evaluation features of earlier validations of this fit."""
        self._start_evaluation("validate")

    def on_test_start(self) -> None:
        """Load the teacher's weights; reuse the evaluation features of the fit's validations."""
        self._start_evaluation("test")

    def on_predict_start(self) -> None:
        """Load the teacher's weights (predict batches are not cached)."""
        self._start_evaluation("predict")

    def teardown(self, stage: str) -> None:
        """After a test, release the evaluation-feature cache (kept from the fit's validations until then)."""
        super().teardown(stage)
        if stage == "test":
            self.evaluation_features.close(self.global_rank)
