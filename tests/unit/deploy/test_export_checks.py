"""Export refuses what it cannot do before any work: a size it needs but lacks, an input the teacher cannot take."""

from __future__ import annotations

from pathlib import Path

import pytest
from anomalib.deploy.export import CompressionType

from anomalib_transformer_student import TransformerStudent

from ...factories import small_model


def _model(**overrides) -> TransformerStudent:
    return small_model(layers=(0, 1), **overrides)


@pytest.mark.parametrize(
    ("overrides", "input_size", "match"),
    [
        ({"tiling": {"tile_size": 112}}, None, r"tiled .* exports for one image size.*input_size=\(height, width\)"),
        ({"pre_processor": False}, None, r"does not resize.*pass input_size=\(56, 56\)"),
        ({}, (0, 40), r"two positive sides \(height, width\), got \[0, 40\]"),
        ({}, (56,), r"two positive sides"),
        ({"pre_processor": False}, (100, 100), r"reaches the teacher as \[100, 100\], but the teacher takes 56 x 56"),
    ],
    ids=["tiled-without-size", "no-resize-without-size", "zero-side", "one-side", "no-resize"],
)
def test_bad_input_size_fails_before_any_file_is_written(
    overrides: dict, input_size: tuple | None, match: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=match):
        _model(**overrides).to_onnx(tmp_path, input_size=input_size)
    assert not any(tmp_path.iterdir())


def test_any_input_size_reaches_the_teacher_through_the_default_pre_processor(tmp_path: Path) -> None:
    """Sides off the 14-px patch grid are fine: the graph pads and resizes (checked before export)."""
    from anomalib_transformer_student.deploy.export import check_input_size

    model = _model()
    for size in [(2048, 2448), (101, 57), (13, 13), None]:  # None: a graph for any height and width
        check_input_size(size, model.pre_processor, model.model.teacher.image_size)


@pytest.mark.parametrize("compression", [CompressionType.INT8_ACQ, "int8_acq"])
def test_int8_acq_is_refused_before_any_work(compression: CompressionType | str, tmp_path: Path) -> None:
    """anomalib's INT8_ACQ would quantise the students too; refused, naming the two INT8 modes that work."""
    with pytest.raises(ValueError, match=r"INT8_ACQ is not supported.*students.*INT8_PTQ.*INT8"):
        _model().to_openvino(tmp_path, input_size=(56, 56), compression_type=compression, datamodule=object())
    assert not any(tmp_path.iterdir())
