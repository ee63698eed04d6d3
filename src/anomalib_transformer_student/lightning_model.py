"""TransformerStudent: the Lightning module that anomalib's Engine and CLI drive.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_transformer_student import TransformerStudent
    >>> engine = Engine(max_epochs=50)
    >>> engine.fit(TransformerStudent(), datamodule=MVTecAD(category="screw"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from anomalib import LearningType
from anomalib.data.transforms import SquarePad
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from .teacher import DEFAULT_LAYERS, DEFAULT_TEACHER, TeacherFeatureExtractor, create_backbone
from .teacher_weights import fetch_pretrained_state_dict
from .torch_model import TransformerStudentModel

if TYPE_CHECKING:
    from anomalib.data import Batch
    from anomalib.metrics import Evaluator
    from anomalib.post_processing import PostProcessor
    from anomalib.visualization import Visualizer
    from lightning.pytorch.utilities.types import STEP_OUTPUT

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 1036

__all__ = ["TransformerStudent"]


class TransformerStudent(AnomalibModule):
    """Learning to Be a Transformer to Pinpoint Anomalies (Costanzino et al., IEEE Access 2025).

    A frozen DINOv2 ViT (the teacher) yields patch tokens at two depths; two shallow MLPs (the
    students), trained on nominal images only, learn to map each depth to the other. Where they
    fail, the image is anomalous. The teacher runs once per image, so the model affords the
    paper's high resolution (1036 px, 74 x 74 patches) that lets it see tiny defects.

    The teacher's pretrained weights are fetched when training (or testing an untrained model)
    starts, not at construction, so that a checkpoint, which holds the teacher, loads offline.

    Args:
        teacher: timm name of the Vision Transformer teacher.
        pretrained: Load the teacher's pretrained weights; ``False`` keeps random weights
            (tests and experiments only).
        layers: Two block indices ``(shallow, deep)``; negative indices count from the end.
        image_size: Side of the square model input in pixels; a multiple of the teacher's patch
            size (14 for DINOv2), else construction fails naming the nearest valid sizes.
        lr: Adam learning rate of the students (the reference code uses 1e-4; the paper's text
            mentions 1e-3).
        blur_kernel_sizes: Odd box-filter sizes of the map smoothing stages.
        blur_repeats: How often each smoothing stage is applied.
        topk_ratio: Fraction of map pixels whose mean is the image score.
        max_epochs: Epochs to train, imposed on the trainer; for anomalib's benchmark pipeline,
            which gives the trainer no options. ``None`` (default) leaves the trainer's own
            setting (``--trainer.max_epochs``; the paper trains 50 epochs).
        pre_processor: Pre-processor, or ``True`` for square edge-pad, bicubic resize to
            ``image_size`` and ImageNet normalisation.
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
        layers: Sequence[int] = DEFAULT_LAYERS,
        image_size: int = DEFAULT_IMAGE_SIZE,
        lr: float = 1e-4,
        blur_kernel_sizes: Sequence[int] = (5, 7),
        blur_repeats: Sequence[int] = (5, 3),
        topk_ratio: float = 0.001,
        max_epochs: int | None = None,
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
        self.pretrained = pretrained
        self.lr = lr
        self.max_epochs = max_epochs
        feature_extractor = TeacherFeatureExtractor(create_backbone(teacher), layers, image_size)
        if not pretrained:
            logger.warning(
                "Teacher '%s' keeps random weights (pretrained=False): fine for tests, meaningless for inspection.",
                teacher,
            )
            feature_extractor.weights_loaded.fill_(True)
        self.model = TransformerStudentModel(feature_extractor, blur_kernel_sizes, blur_repeats, topk_ratio)
        if pre_processor is True:
            self.pre_processor = self.configure_pre_processor((image_size, image_size))

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Square edge-pad, bicubic resize to ``image_size`` (default 1036 x 1036), ImageNet normalisation."""
        image_size = image_size or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        return PreProcessor(
            transform=Compose(
                [
                    SquarePad(),
                    Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                    Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
                ]
            ),
        )

    def load_teacher_weights(self) -> None:
        """Fetch and load the teacher's pretrained weights unless the teacher already holds them."""
        teacher = self.model.teacher
        if bool(teacher.weights_loaded):
            return
        teacher.load_backbone_state_dict(fetch_pretrained_state_dict(self.teacher_name))

    def on_fit_start(self) -> None:
        """Load the teacher's weights before the first batch (after any checkpoint restore)."""
        self.load_teacher_weights()

    def on_validation_start(self) -> None:
        """Load the teacher's weights before validating an untrained model."""
        self.load_teacher_weights()

    def on_test_start(self) -> None:
        """Load the teacher's weights before testing an untrained model."""
        self.load_teacher_weights()

    def on_predict_start(self) -> None:
        """Load the teacher's weights before predicting with an untrained model."""
        self.load_teacher_weights()

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on nominal images only."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Only ``max_epochs`` when the constructor was given one; the paper's 50 epochs are in the configs."""
        return {} if self.max_epochs is None else {"max_epochs": self.max_epochs}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over both students; the teacher is frozen."""
        students = chain(self.model.forward_student.parameters(), self.model.backward_student.parameters())
        return torch.optim.Adam(students, lr=self.lr)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Cosine loss of both students on a batch of nominal images."""
        del args, kwargs
        loss = self.model(batch.image)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.image))
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps and scores for validation images."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())
