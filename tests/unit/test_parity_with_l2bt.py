"""Our torch model against anomalib's own L2BT port, with shared random teacher and student weights."""

from __future__ import annotations

import pytest
import timm
import torch
from anomalib.models.image.l2bt import teacher as l2bt_teacher
from anomalib.models.image.l2bt.anomaly_map import L2BTAnomalyMapGenerator
from anomalib.models.image.l2bt.torch_model import L2BTModel

from anomalib_transformer_student.model.anomaly_map import top_k_mean
from anomalib_transformer_student.model.teacher import TeacherFeatureExtractor
from anomalib_transformer_student.model.torch_model import TransformerStudentModel

TEACHER = "vit_base_patch14_reg4_dinov2"
IMAGE_SIZE = 224


@pytest.fixture(scope="module")
def models(monkeypatch_module: pytest.MonkeyPatch) -> tuple[L2BTModel, TransformerStudentModel]:
    torch.manual_seed(0)
    # L2BT always asks for pretrained weights; the same architecture with random ones works offline.
    build_extractor = l2bt_teacher.TimmFeatureExtractor

    def random_extractor(*args, **kwargs):
        return build_extractor(*args, **{**kwargs, "pre_trained": False})

    monkeypatch_module.setattr(l2bt_teacher, "TimmFeatureExtractor", random_extractor)
    reference = L2BTModel(layers=(7, 11)).eval()
    source = timm.create_model(TEACHER, pretrained=False, num_classes=0)
    source.load_state_dict(reference.teacher.fe.feature_extractor.state_dict(), strict=False)

    teacher = TeacherFeatureExtractor(
        timm.create_model(TEACHER, pretrained=False, num_classes=0), (7, 11), IMAGE_SIZE
    )
    teacher.load_backbone_state_dict(source.state_dict())
    ours = TransformerStudentModel(teacher)
    for ours_student, reference_student in (
        (ours.forward_student, reference.forward_net),
        (ours.backward_student, reference.backward_net),
    ):
        for ours_parameter, reference_parameter in zip(
            ours_student.parameters(), reference_student.parameters(), strict=True
        ):
            ours_parameter.data.copy_(reference_parameter.data)
    return reference, ours.eval()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def test_teacher_features_match(
    models: tuple[L2BTModel, TransformerStudentModel], images: torch.Tensor
) -> None:
    reference, ours = models
    for reference_tokens, our_tokens in zip(
        reference.extract_teacher_features(images), ours.teacher(images), strict=True
    ):
        assert our_tokens.shape == (3, (IMAGE_SIZE // 14) ** 2, 768)
        torch.testing.assert_close(our_tokens, reference_tokens, atol=1e-5, rtol=0)


def test_anomaly_maps_and_scores_match(
    models: tuple[L2BTModel, TransformerStudentModel], images: torch.Tensor
) -> None:
    reference, ours = models
    with torch.no_grad():
        expected = reference(images)
        actual = ours(images)
    assert actual.anomaly_map.shape == expected.anomaly_map.shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=1e-5, rtol=0)
    # The images differ, so equal scores cannot come from a constant output.
    assert actual.pred_score.std() > 0


def test_training_losses_match(
    models: tuple[L2BTModel, TransformerStudentModel], images: torch.Tensor
) -> None:
    reference, ours = models
    reference.train()
    ours.train()
    try:
        expected = reference(images)["loss"]
        actual = ours(images)
    finally:
        reference.eval()
        ours.eval()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert actual.requires_grad


@pytest.mark.parametrize(
    ("height", "width", "ratio"),
    [(10, 18, 0.35), (1036, 1036, 0.001), (224, 224, 0.001), (7, 3, 0.1), (1000, 1500, 0.001)],
)
def test_top_k_score_takes_as_many_pixels_as_the_reference(height: int, width: int, ratio: float) -> None:
    """``k`` depends on the order of the float product: 0.35 * 10 * 18 -> 63 pixels, the reference takes 62."""
    maps = torch.zeros(2, 1, height, width)
    maps[:, :, 0, 0] = 1.0  # the score is then exactly 1 / k
    reference = L2BTAnomalyMapGenerator(patch_size=14, topk_ratio=ratio)._score_topk_mean(maps)
    assert torch.equal(top_k_mean(maps, ratio), reference)
