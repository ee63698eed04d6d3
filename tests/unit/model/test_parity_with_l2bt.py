"""Our torch model against anomalib's own L2BT port, with shared random teacher and student weights.

The two interpolate the teacher's positional embedding differently away from 518 px: we follow the official
DINOv2 model (bicubic with antialiasing for registers models), L2BT resamples in every forward with timm's
``resample_abs_pos_embed``, which anomalib patches to ``antialias=False``. Tokens, maps, scores and losses are
compared where both agree by construction: at 224 px with L2BT's resampled positional embedding copied into
our teacher, and at 518 px, the native grid, where neither interpolates.
"""

from __future__ import annotations

import pytest
import timm
import torch
from anomalib.models.image.l2bt import teacher as l2bt_teacher
from anomalib.models.image.l2bt.anomaly_map import L2BTAnomalyMapGenerator
from anomalib.models.image.l2bt.torch_model import L2BTModel
from timm.models import vision_transformer

from anomalib_transformer_student.model.anomaly_map import top_k_mean
from anomalib_transformer_student.model.teacher import TeacherFeatureExtractor
from anomalib_transformer_student.model.torch_model import TransformerStudentModel

TEACHER = "vit_base_patch14_reg4_dinov2"
IMAGE_SIZE = 224
NATIVE_SIZE = 518


def l2bt_pos_embed(reference: L2BTModel, image_size: int) -> torch.Tensor:
    """The positional embedding L2BT adds at ``image_size``: the call its timm backbone's ``_pos_embed`` makes."""
    backbone = reference.teacher.fe.feature_extractor
    assert backbone.dynamic_img_size
    assert getattr(vision_transformer.resample_abs_pos_embed, "_anomalib_no_antialias", False)
    grid = image_size // backbone.patch_embed.patch_size[0]
    return vision_transformer.resample_abs_pos_embed(
        backbone.pos_embed.data,
        new_size=(grid, grid),
        old_size=backbone.patch_embed.grid_size,
        num_prefix_tokens=0 if backbone.no_embed_class else backbone.num_prefix_tokens,
    )


def our_teacher(reference: L2BTModel, image_size: int) -> TeacherFeatureExtractor:
    """Our teacher with L2BT's teacher weights, loaded as timm weights are (native pos-embed resampled)."""
    teacher = TeacherFeatureExtractor(timm.create_model(TEACHER, pretrained=False, num_classes=0), (7, 11), image_size)
    teacher.load_backbone_state_dict(reference.teacher.fe.feature_extractor.state_dict())
    return teacher


@pytest.fixture(scope="module")
def reference(monkeypatch_module: pytest.MonkeyPatch) -> L2BTModel:
    torch.manual_seed(0)
    # L2BT always asks for pretrained weights; the same architecture with random ones works offline.
    build_extractor = l2bt_teacher.TimmFeatureExtractor

    def random_extractor(*args, **kwargs):
        return build_extractor(*args, **{**kwargs, "pre_trained": False})

    monkeypatch_module.setattr(l2bt_teacher, "TimmFeatureExtractor", random_extractor)
    return L2BTModel(layers=(7, 11)).eval()


@pytest.fixture(scope="module")
def models(reference: L2BTModel) -> tuple[L2BTModel, TransformerStudentModel]:
    """L2BT and our model at 224 px with the same weights, our positional embedding replaced by L2BT's."""
    teacher = our_teacher(reference, IMAGE_SIZE)
    teacher.backbone.pos_embed.data.copy_(l2bt_pos_embed(reference, IMAGE_SIZE))
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


def test_teacher_features_match(models: tuple[L2BTModel, TransformerStudentModel], images: torch.Tensor) -> None:
    """Reference: L2BT's teacher tokens at 224 px, with its positional embedding in our teacher."""
    reference, ours = models
    for reference_tokens, our_tokens in zip(
        reference.extract_teacher_features(images), ours.teacher(images), strict=True
    ):
        assert our_tokens.shape == (3, (IMAGE_SIZE // 14) ** 2, 768)
        torch.testing.assert_close(our_tokens, reference_tokens, atol=1e-5, rtol=0)


def test_anomaly_maps_and_scores_match(models: tuple[L2BTModel, TransformerStudentModel], images: torch.Tensor) -> None:
    """Reference: L2BT's anomaly maps and image scores at 224 px, with its positional embedding in our teacher."""
    reference, ours = models
    with torch.no_grad():
        expected = reference(images)
        actual = ours(images)
    assert actual.anomaly_map.shape == expected.anomaly_map.shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=1e-5, rtol=0)
    # The images differ, so equal scores cannot come from a constant output.
    assert actual.pred_score.std() > 0


def test_training_losses_match(models: tuple[L2BTModel, TransformerStudentModel], images: torch.Tensor) -> None:
    """Reference: L2BT's training loss at 224 px, with its positional embedding in our teacher."""
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


def test_teacher_features_match_at_the_native_size(reference: L2BTModel) -> None:
    """Reference: L2BT's teacher tokens at 518 px, where neither model interpolates the positional embedding."""
    teacher = our_teacher(reference, NATIVE_SIZE)
    images = torch.randn(1, 3, NATIVE_SIZE, NATIVE_SIZE, generator=torch.Generator().manual_seed(2))
    for reference_tokens, our_tokens in zip(reference.extract_teacher_features(images), teacher(images), strict=True):
        assert our_tokens.shape == (1, (NATIVE_SIZE // 14) ** 2, 768)
        torch.testing.assert_close(our_tokens, reference_tokens, atol=1e-5, rtol=0)


def test_l2bt_interpolates_differently_away_from_the_native_size(reference: L2BTModel) -> None:
    """Reference: L2BT's positional embedding at 224 px, which lacks the official antialiasing."""
    ours = our_teacher(reference, IMAGE_SIZE).backbone.pos_embed.data
    assert (ours - l2bt_pos_embed(reference, IMAGE_SIZE)).abs().max() > 1e-3


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
