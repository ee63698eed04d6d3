"""One owner of evaluation geometry: the evaluation steps and ``forward`` (export) place the map alike.

As in anomalib, the steps resize with the pre-processor's transform and ``forward`` with its export
transform (no antialiasing, for OpenVINO); the tests give both paths the same transform, so that any
difference between them is geometry.
"""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.model.pre_processing import OriginalSizePreProcessor

from ...factories import small_model

SIZE = 224
ORIGINAL = (150, 100)


def _resize() -> Compose:
    return Compose(
        [
            Resize((SIZE, SIZE), interpolation=InterpolationMode.BICUBIC, antialias=True),
            Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )


def _model(**overrides) -> TransformerStudent:
    torch.manual_seed(0)
    model = small_model(image_size=SIZE, layers=(1, 3), **overrides)
    model.pre_processor.export_transform = model.pre_processor.transform
    return model.eval()


def _step(model: TransformerStudent, images: torch.Tensor) -> ImageBatch:
    """What a test step returns for ``images``, after the pre-processor's batch hook, as in a Trainer."""
    batch = ImageBatch(image=images.clone(), gt_label=torch.zeros(len(images), dtype=torch.long))
    model.pre_processor.on_test_batch_start(None, model, batch, 0)
    with torch.no_grad():
        return model.test_step(batch)


def _forward(model: TransformerStudent, images: torch.Tensor) -> torch.Tensor:
    model.post_processor = None  # raw maps: forward's post-processing would otherwise only rescale them
    with torch.no_grad():
        return model(images).anomaly_map


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, *ORIGINAL, generator=torch.Generator().manual_seed(0))


def test_default_pre_processor_gives_the_same_full_resolution_map_in_both_paths(images: torch.Tensor) -> None:
    model = _model()
    stepped, exported = _step(model, images).anomaly_map, _forward(model, images)
    assert stepped.shape[-2:] == exported.shape[-2:] == ORIGINAL
    torch.testing.assert_close(exported, stepped.reshape(exported.shape), rtol=0, atol=1e-5)


def test_custom_pre_processor_gives_the_same_map_in_both_paths(images: torch.Tensor) -> None:
    """A plain Resize stretches: the map comes at the pre-processed size in both paths, not cut from a square."""
    model = _model(pre_processor=PreProcessor(transform=_resize()))
    stepped, exported = _step(model, images).anomaly_map, _forward(model, images)
    assert stepped.shape[-2:] == exported.shape[-2:] == (SIZE, SIZE)
    torch.testing.assert_close(exported, stepped.reshape(exported.shape), rtol=0, atol=1e-5)


def test_original_size_without_square_padding_stretches_the_map_back(images: torch.Tensor) -> None:
    """Kept at the original size with a transform that does not pad: the map is stretched back, not cropped."""
    stretched = _model(pre_processor=OriginalSizePreProcessor(_resize()))
    plain = _model(pre_processor=PreProcessor(transform=_resize()))
    plain.load_state_dict(stretched.state_dict())
    full, small = _forward(stretched, images), _forward(plain, images)
    assert full.shape[-2:] == ORIGINAL
    assert _step(stretched, images).anomaly_map.shape[-2:] == ORIGINAL
    # Upsampling the same patch map to 150 x 100 instead of 224 x 224: same values, other sampling positions.
    assert full.max() <= small.max() + 1e-4
    assert full.min() >= small.min() - 1e-4
