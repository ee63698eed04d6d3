"""Export of TransformerStudent through anomalib's ``ExportMixin``: input checks and INT8 policy.

anomalib exports every model the same way (``to_torch``, ``to_onnx``, ``to_openvino``; the
graph holds pre-processing, model and post-processing). This model adds:

- Checks before any export work: ``input_size`` is given and the pre-processing turns it into
  the teacher's input (any size does with the default pre-processor, which pads and resizes);
  ``INT8_PTQ`` has a datamodule and a validated model; ``INT8_ACQ`` is refused.
- A model never validated has no normalisation statistics or thresholds. As in anomalib it
  still exports, returning raw scores; a warning says so. A teacher whose pretrained weights
  were never loaded gets them first, as before testing or predicting.
- ONNX opset 18 by default, the oldest that torch's exporter implements (anomalib asks for 14,
  which goes through a version converter that fails on this graph and keeps opset 18 anyway).
- INT8 compression of the teacher only (``INT8``, ``INT8_PTQ``). The students are tiny, and the discrepancy maths and
  the map smoothing turn small differences of normalised features into the anomaly map:
  quantised, they lose the signal (image AUROC falls to chance). Nodes are told apart by the
  module scope that the ONNX exporter records on each.
- Post-training quantisation uses NNCF's scheme for Transformers (anomalib's call, with the default
  scheme over the whole graph, made a graph that OpenVINO's CPU plugin could not compile) and
  keeps the attention products in float: quantised, they miss OpenVINO's fused attention kernel,
  and at 1036 px (5,476 tokens) a CPU without INT8 dot-product units ran them slower than FP32 and
  with four times its peak memory (``benchmarks/inference_speed.py --variants ov-int8-ptq-attention``).
- ``INT8_ACQ`` (anomalib's accuracy-controlled quantisation) is refused before any work: anomalib
  quantises the whole graph there, students included, and calibrates on images at their
  original size, which a fixed-size graph does not take.

The mixin reads its host only through ``model.teacher.image_size``, ``pre_processor``,
``post_processor`` and ``load_teacher_weights()``; it imports nothing of the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib.deploy.export import CompressionType
from anomalib.post_processing import PostProcessor
from torch.nn import functional

if TYPE_CHECKING:
    from anomalib.data import AnomalibDataModule, Batch
    from openvino import Model
    from torch import nn

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
TEACHER_SCOPE = "model.teacher"
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CALIBRATED_COMPRESSION = (CompressionType.INT8_PTQ,)
REFUSED_COMPRESSION = {
    CompressionType.INT8_ACQ: (
        "anomalib's accuracy-controlled quantisation would quantise the whole graph, students included, which "
        "loses the anomaly signal; use INT8_PTQ (calibrated, teacher only) or INT8 (weights of the teacher only)"
    ),
}
RECOMMENDED_CALIBRATION_IMAGES = 300


def check_input_size(
    input_size: Sequence[int] | None, pre_processor: nn.Module | None, teacher_side: int, tiled: bool = False
) -> None:
    """Raise a ``ValueError`` unless pre-processing turns ``input_size`` into the teacher's input size.

    Without ``input_size`` the graph takes any height and width; that needs a pre-processor that
    resizes (the default one pads and resizes any size) and no tiling (the tile count follows the
    image's size, so a tiled model exports for one size). With ``input_size`` and the default
    pre-processor any size works; without resizing, the input must already be ``teacher_side`` square.

    Raises:
        ValueError: If ``input_size`` is not two positive sides, or pre-processed to another size than
            the teacher takes, or missing where a fixed size is needed; the message names the size that works.
    """
    if input_size is None:
        if tiled:
            msg = (
                "A tiled TransformerStudent (tiling.tile_size set) exports for one image size, since the number of "
                'tiles follows it: pass input_size=(height, width) (CLI: --input_size "[2048,2448]"), the size of the '
                "images the deployed model receives."
            )
            raise ValueError(msg)
        if not _resizes(pre_processor, teacher_side):
            msg = (
                f"This pre-processor does not resize images to the teacher's {teacher_side} x {teacher_side}, so the "
                f"exported model takes one size only: pass input_size=({teacher_side}, {teacher_side}) "
                f'(CLI: --input_size "[{teacher_side},{teacher_side}]"), or use the default pre-processor, which pads '
                "and resizes any size."
            )
            raise ValueError(msg)
        return
    if len(input_size) != 2 or any(int(side) < 1 for side in input_size):
        msg = f"input_size must be two positive sides (height, width), got {list(input_size)}."
        raise ValueError(msg)
    pre_processed = _pre_processed_size(pre_processor, tuple(int(side) for side in input_size))
    if pre_processed != (teacher_side, teacher_side):
        msg = (
            f"input_size {list(input_size)} reaches the teacher as {list(pre_processed)}, but the teacher takes "
            f"{teacher_side} x {teacher_side}: export with input_size=({teacher_side}, {teacher_side}), or use a "
            "pre-processor that resizes (the default one pads and resizes any size)."
        )
        raise ValueError(msg)


def _pre_processed_size(pre_processor: nn.Module | None, size: tuple[int, int]) -> tuple[int, int]:
    sample = torch.zeros(1, 3, *size)
    return tuple(pre_processor(sample).shape[-2:]) if pre_processor else size


def _resizes(pre_processor: nn.Module | None, teacher_side: int) -> bool:
    """Whether the pre-processor brings images of different sizes to the teacher's square input."""
    sizes = ((teacher_side + 3, teacher_side + 3), (teacher_side // 2 + 1, teacher_side + 5))
    return all(_pre_processed_size(pre_processor, size) == (teacher_side, teacher_side) for size in sizes)


def check_compression(compression_type: CompressionType | str | None) -> None:
    """Raise a ``ValueError`` for a compression this model refuses (``INT8_ACQ``), naming the alternatives."""
    if compression_type is None:
        return
    compression = CompressionType(compression_type)
    if compression in REFUSED_COMPRESSION:
        reason = REFUSED_COMPRESSION[compression]
        msg = f"compression_type {compression.name} is not supported for TransformerStudent: {reason}."
        raise ValueError(msg)


def lacks_statistics(post_processor: nn.Module | None) -> bool:
    """Whether ``post_processor`` normalises outputs but lacks the statistics and thresholds validation sets."""
    if not isinstance(post_processor, PostProcessor) or not post_processor.enable_normalization:
        return False
    statistics = (post_processor.image_min, post_processor.image_max, post_processor.image_threshold)
    return any(torch.isnan(value).any() for value in statistics)


def check_calibration(
    compression_type: CompressionType | str | None, datamodule: object, post_processor: nn.Module | None
) -> None:
    """Raise a ``ValueError`` if a calibrated compression lacks data or a validated model.

    Raises:
        ValueError: If ``INT8_PTQ`` is asked without a datamodule, or for a model whose
            post-processor has no normalisation statistics (unset, they are NaN constants in the graph,
            and OpenVINO's CPU plugin cannot compile the quantised graph).
    """
    if compression_type is None or CompressionType(compression_type) not in CALIBRATED_COMPRESSION:
        return
    name = CompressionType(compression_type).name
    if datamodule is None:
        msg = (
            f"compression_type {name} calibrates on images: pass a datamodule "
            "(CLI: --data ..., e.g. the training data; its validation images are used)."
        )
        raise ValueError(msg)
    if lacks_statistics(post_processor):
        msg = (
            f"compression_type {name} needs a trained and validated model, but this one has no normalisation "
            "statistics; export the checkpoint that training wrote (--ckpt_path), or use FP16 or INT8."
        )
        raise ValueError(msg)


def non_teacher_nodes(onnx_path: str | Path) -> frozenset[str]:
    """Names of the nodes of an exported ONNX graph that lie outside the teacher.

    Raises:
        RuntimeError: If the graph records no module scopes (not made by torch's dynamo exporter).
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    scopes = {
        node.name: {entry.key: entry.value for entry in node.metadata_props}.get(NAME_SCOPES_KEY, "")
        for node in graph.node
    }
    teacher = {name for name, scope in scopes.items() if f"'{TEACHER_SCOPE}" in scope}
    if not teacher:
        msg = (
            "The exported graph records no module scopes, so INT8 compression cannot tell the teacher apart; "
            "export with torch's dynamo-based ONNX exporter (torch >= 2.6)."
        )
        raise RuntimeError(msg)
    return frozenset(set(scopes) - teacher)


def calibration_images(batch: Batch, size: tuple[int, int] | None) -> torch.Tensor:
    """A datamodule batch as the exported model receives it: images resized to its input ``size``.

    This model's datamodules keep images at their original size (its pre-processing resizes); a graph
    without a fixed size (``size`` ``None``) takes them as they are.
    """
    images = batch.image
    if size is not None and tuple(images.shape[-2:]) != size:
        images = functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return images


class TransformerStudentExportMixin:
    """Export checks and INT8 policy around anomalib's ``ExportMixin``; list it before ``AnomalibModule``.

    The host provides ``model`` (with ``model.teacher.image_size``), ``pre_processor``, ``post_processor``
    and ``load_teacher_weights()``.

    Example:
        A model class lists it before ``AnomalibModule`` (as ``TransformerStudent`` does)::

            class Model(TransformerStudentExportMixin, AnomalibModule): ...

            Model().to_openvino("exports", input_size=(2048, 2448), compression_type="int8")
    """

    model: nn.Module
    pre_processor: nn.Module | None
    post_processor: nn.Module | None
    load_teacher_weights: Callable[[], None]
    _non_teacher_nodes: frozenset[str] = frozenset()
    # OpenVINO operation types of the teacher that INT8 post-training quantisation leaves in float;
    # ``benchmarks/inference_speed.py`` clears it to measure the teacher quantised whole.
    ptq_float_operations: tuple[str, ...] = ("ScaledDotProductAttention",)

    def _prepare_export(self) -> None:
        """Warn about unnormalised outputs and load the teacher's weights if they never were."""
        if lacks_statistics(self.post_processor):
            logger.warning(
                "Exporting a model without normalisation statistics or thresholds (it was never validated): the "
                "exported model returns raw, unnormalised scores and maps, and its labels compare raw scores with "
                "0.5. Train it first (anomalib train, or Engine.fit, which validates) and export its checkpoint."
            )
        self.load_teacher_weights()

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Run anomalib's ``to_torch`` after the untrained-model warning."""
        self._prepare_export()
        return super().to_torch(export_root, model_file_name)  # type: ignore[misc]

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,  # passthrough to torch.onnx.export
    ) -> Path:
        """Run anomalib's ``to_onnx`` (opset 18 unless given) once ``input_size`` is checked.

        Raises:
            ValueError: If ``input_size`` is missing or does not reach the teacher at its input size.
        """
        check_input_size(input_size, self.pre_processor, self.model.teacher.image_size, self.tiling is not None)
        self._prepare_export()
        kwargs.setdefault("opset_version", ONNX_OPSET)
        onnx_path = super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]
        self._non_teacher_nodes = non_teacher_nodes(onnx_path)
        return onnx_path

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        **kwargs: Any,  # metric, task, max_drop, ov_kwargs, onnx_kwargs
    ) -> Path:
        """Run anomalib's ``to_openvino`` once the input size and any calibration needs are checked.

        Raises:
            ValueError: If ``input_size`` is missing or does not reach the teacher at its input size, the
                compression is ``INT8_ACQ``, or ``INT8_PTQ`` lacks a datamodule or a validated model.
        """
        check_compression(compression_type)
        check_input_size(input_size, self.pre_processor, self.model.teacher.image_size, self.tiling is not None)
        check_calibration(compression_type, datamodule, self.post_processor)
        return super().to_openvino(  # type: ignore[misc]
            export_root, model_file_name, input_size, compression_type, datamodule, **kwargs
        )

    def _ignored_scope(self, types: Sequence[str] = ()) -> Any:  # nncf.IgnoredScope; nncf is imported lazily
        """Everything outside the teacher, and the teacher's operations of the given OpenVINO ``types``."""
        import nncf

        return nncf.IgnoredScope(names=sorted(self._non_teacher_nodes), types=list(types), validate=False)

    def _compress_ov_model(
        self, model: Model, compression_type: CompressionType | None = None, *args: Any, **kwargs: Any
    ) -> Model:
        """INT8 weight compression of the teacher only; other compressions as anomalib makes them."""
        if compression_type == CompressionType.INT8:
            import nncf

            return nncf.compress_weights(model, ignored_scope=self._ignored_scope())
        return super()._compress_ov_model(model, compression_type, *args, **kwargs)  # type: ignore[misc]

    def _post_training_quantization_ov(self, model: Model, datamodule: AnomalibDataModule | None = None) -> Model:
        """INT8 quantisation of the teacher but its attention, calibrated on the datamodule's validation images."""
        import nncf

        check_calibration(CompressionType.INT8_PTQ, datamodule, self.post_processor)
        datamodule.setup("fit")
        shape = model.input(0).get_partial_shape()
        size = (shape[2].get_length(), shape[3].get_length()) if shape[2].is_static and shape[3].is_static else None
        dataloader = datamodule.val_dataloader()
        if len(dataloader.dataset) < RECOMMENDED_CALIBRATION_IMAGES:
            logger.warning(
                ">%d images recommended for INT8 quantization, found only %d images",
                RECOMMENDED_CALIBRATION_IMAGES,
                len(dataloader.dataset),
            )
        return nncf.quantize(
            model,
            nncf.Dataset(dataloader, lambda batch: calibration_images(batch, size)),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=min(RECOMMENDED_CALIBRATION_IMAGES, len(dataloader)),  # batches
            ignored_scope=self._ignored_scope(types=self.ptq_float_operations),
        )
