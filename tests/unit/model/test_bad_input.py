"""Bad constructor arguments fail at construction with messages that name the fix."""

from __future__ import annotations

import pytest
import torch

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.model.anomaly_map import AnomalyMapGenerator
from anomalib_transformer_student.model.teacher import check_image_size, normalise_layers

from ...helpers import SMALL_TEACHER


@pytest.mark.parametrize(
    ("layers", "fragment"),
    [((7, 12), "out of range"), ((-13, 11), "out of range"), ((5, 5), "two different blocks"),
     ((7,), "exactly two"), ((3, 7, 11), "exactly two"), ((11, -1), "two different blocks")],
)  # fmt: skip
def test_bad_layers_raise_with_valid_range(layers: tuple[int, ...], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as error:
        normalise_layers(layers, depth=12)
    assert "0..11" in str(error.value)


def test_negative_layers_count_from_the_end() -> None:
    assert normalise_layers((-5, -1), depth=12) == (7, 11)


def test_layers_checked_at_construction() -> None:
    with pytest.raises(ValueError, match=r"0\.\.11"):
        TransformerStudent(teacher=SMALL_TEACHER, pretrained=False, image_size=112, layers=(7, 12))


def test_image_size_not_multiple_of_patch_names_nearest_sizes() -> None:
    with pytest.raises(ValueError, match="use 994 or 1008"):
        check_image_size(1000, 14)
    with pytest.raises(ValueError, match="multiple"):
        check_image_size(5, 14)
    with pytest.raises(ValueError, match="patch size 14"):
        TransformerStudent(teacher=SMALL_TEACHER, pretrained=False, image_size=100)


def test_unknown_teacher_says_how_to_list_names() -> None:
    with pytest.raises(ValueError, match=r"timm.list_models"):
        TransformerStudent(teacher="vit_does_not_exist", pretrained=False)


def test_non_vit_teacher_is_refused() -> None:
    with pytest.raises(ValueError, match="not as a Vision Transformer"):
        TransformerStudent(teacher="resnet18", pretrained=False)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"blur_kernel_sizes": (4, 7)}, "odd"), ({"blur_repeats": (5,)}, "same length"),
     ({"topk_ratio": 0.0}, r"\(0, 1\]"), ({"blur_repeats": (5, -1)}, "non-negative")],
)  # fmt: skip
def test_bad_map_settings(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        AnomalyMapGenerator(**kwargs)


def test_layer_order_is_respected() -> None:
    torch.manual_seed(0)
    model = TransformerStudent(teacher=SMALL_TEACHER, pretrained=False, image_size=56, layers=(3, 9))
    swapped = TransformerStudent(teacher=SMALL_TEACHER, pretrained=False, image_size=56, layers=(9, 3))
    swapped.model.teacher.backbone.load_state_dict(model.model.teacher.backbone.state_dict())
    images = torch.randn(1, 3, 56, 56)
    shallow, deep = model.model.teacher(images)
    deep_first, shallow_second = swapped.model.teacher(images)
    torch.testing.assert_close(deep_first, deep)
    torch.testing.assert_close(shallow_second, shallow)
