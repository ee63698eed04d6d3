"""`anomalib export` of TransformerStudent: ONNX and OpenVINO FP32, FP16, INT8 and INT8 PTQ answer as PyTorch does.

A checkpoint from `anomalib train` is exported through the unmodified `anomalib` console script; the
exports run in anomalib's ``OpenVINOInferencer`` on the generated test images and on unseen images of
the same kind, and are compared with the PyTorch model loaded from the same checkpoint.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import timm
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer
from scipy.stats import spearmanr
from torchmetrics.functional.classification import binary_auroc

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset

from ...factories import TeacherCalls, make_datamodule, small_model
from ...helpers import SMALL_MODEL_ARGS, checkpoints, data_args, run_cli, run_cli_in_sequence

pytestmark = pytest.mark.slow

SIZE = 112
# Six of ViT-S's twelve blocks: a smaller graph, and blocks beyond the deepest layer that export must leave out.
LAYERS = (3, 5)
MODEL_ARGS = [*SMALL_MODEL_ARGS, "--model.layers", str(list(LAYERS)).replace(" ", "")]
# anomalib's CLI takes the enum names; no option at all means no compression. All but "fp32_fixed" are exported
# as anomalib exports every model, without --input_size: one graph for any height and width.
EXPORTS = {
    "fp32": ["--export_type", "openvino"],
    "fp32_fixed": ["--export_type", "openvino", "--input_size", f"[{SIZE},{SIZE}]"],
    "fp16": ["--export_type", "openvino", "--compression_type", "FP16"],
    "int8": ["--export_type", "openvino", "--compression_type", "INT8"],
    "int8_ptq": ["--export_type", "openvino", "--compression_type", "INT8_PTQ"],
    "onnx": ["--export_type", "onnx"],
}
FP32 = {"INFERENCE_PRECISION_HINT": "f32"}  # CPUs with bf16 units would otherwise compute an FP32 graph in bf16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Training data (test split: 4 good, 6 defective images) and unseen images of the same kind (24 and 36)."""
    root = tmp_path_factory.mktemp("export_data")
    spec = DemoDatasetSpec(categories=("brick",), image_size=SIZE, n_train=8, n_test_good=4, n_test_per_defect=2)
    unseen = DemoDatasetSpec(
        categories=("brick",), image_size=SIZE, n_train=1, n_test_good=24, n_test_per_defect=12, seed=1
    )
    return {
        "train": generate_demo_dataset(root / "train", spec),
        "unseen": generate_demo_dataset(root / "unseen", unseen),
    }


@pytest.fixture(scope="module")
def checkpoint(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint from `anomalib train`, validated once at the end (normalisation and thresholds set).

    Fifteen epochs at a higher learning rate cost little more than one (the teacher's features are
    cached after the first) and separate good from defective images clearly, so that compression
    effects on AUROC are not lost among near-ties. Seeded, so that every run compares the same model.
    """
    workdir = tmp_path_factory.mktemp("export_train")
    result = run_cli(
        ["train", "--model", "TransformerStudent", *MODEL_ARGS, "--model.lr", "1e-3", *data_args(data["train"]),
         "--trainer.max_epochs", "15", "--trainer.check_val_every_n_epoch", "15",
         "--default_root_dir", str(workdir / "results")],
        cwd=workdir,
        seed=0,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return checkpoints(workdir / "results")[0]


@pytest.fixture(scope="module")
def exports(checkpoint: Path, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every export of ``EXPORTS`` by `anomalib export`; name -> exported file.

    Two processes run three exports each, one after the other, so that each pays anomalib's imports once.
    """
    workdir = tmp_path_factory.mktemp("exports")

    def arguments(name: str) -> list[str]:
        calibration = data_args(data["train"]) if name == "int8_ptq" else []
        return ["export", "--model", "TransformerStudent", *MODEL_ARGS, "--ckpt_path", str(checkpoint),
                *EXPORTS[name], *calibration, "--export_root", str(workdir / name)]  # fmt: skip

    def export(names: list[str]) -> None:
        result = run_cli_in_sequence([arguments(name) for name in names], cwd=workdir)
        assert result.returncode == 0, f"{names}: {result.stderr[-3000:]}"

    lanes = [["int8_ptq", "fp32_fixed", "onnx"], ["fp32", "fp16", "int8"]]  # PTQ's calibration is the longest
    assert sorted(name for lane in lanes for name in lane) == sorted(EXPORTS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(export, lanes))
    exported = {}
    for name in EXPORTS:
        (exported[name],) = (workdir / name).rglob("*.onnx" if name == "onnx" else "*.xml")
    return exported


@pytest.fixture(scope="module")
def images(data: dict[str, Path]) -> dict[str, list[Path]]:
    """The test split of the training data (some of which set the thresholds) and the unseen images."""
    return {name: sorted((root / "brick" / "test").rglob("*.png")) for name, root in data.items()}


@pytest.fixture(scope="module")
def pytorch(checkpoint: Path, images: dict[str, list[Path]]) -> dict[str, list]:
    """The PyTorch model's predictions (its export forward: pre-processing, model, post-processing)."""
    model = TransformerStudent.load_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        return {
            name: [model(read_image(path, as_tensor=True)[None]) for path in paths] for name, paths in images.items()
        }


@pytest.fixture(scope="module")
def openvino(
    exports: dict[str, Path], images: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, list]]:
    """Predictions of each export by ``OpenVINOInferencer`` on CPU with FP32 arithmetic."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("openvino_cache"))  # the inferencer writes its cache here
        predictions = {}
        for name, path in exports.items():
            inferencer = OpenVINOInferencer(path, device="CPU", config=FP32)
            predictions[name] = {kind: [inferencer.predict(p) for p in paths] for kind, paths in images.items()}
    return predictions


def maps(predictions: list) -> np.ndarray:
    return np.stack([np.asarray(prediction.anomaly_map, dtype=np.float32).squeeze() for prediction in predictions])


def scores(predictions: list) -> torch.Tensor:
    return torch.tensor([float(np.asarray(prediction.pred_score).squeeze()) for prediction in predictions])


def labels(predictions: list) -> list[bool]:
    return [bool(np.asarray(prediction.pred_label).squeeze()) for prediction in predictions]


def auroc(predictions: list, paths: list[Path]) -> float:
    defective = torch.tensor([path.parent.name != "good" for path in paths])
    return float(binary_auroc(scores(predictions), defective))


def test_exports_without_input_size_take_any_height_and_width(exports: dict[str, Path]) -> None:
    for name, path in exports.items():
        shape = ov.Core().read_model(path).input(0).get_partial_shape()
        spatial = [shape[2].is_dynamic, shape[3].is_dynamic]
        assert spatial == ([False, False] if name == "fp32_fixed" else [True, True]), name
        if name == "fp32_fixed":
            assert [shape[2].get_length(), shape[3].get_length()] == [SIZE, SIZE]


THREE_SIZES = [(SIZE, SIZE), (150, 90), (101, 57)]  # square, non-square, off the 14-px patch grid


@pytest.mark.parametrize("name", ["fp32", "onnx"])
def test_one_dynamic_graph_answers_three_sizes_in_a_row_as_pytorch_does(
    name: str, checkpoint: Path, exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = TransformerStudent.load_from_checkpoint(checkpoint).eval()
    inferencer = OpenVINOInferencer(exports[name], device="CPU", config=FP32)
    generator = torch.Generator().manual_seed(0)
    for height, width in THREE_SIZES:
        image = torch.rand(3, height, width, generator=generator)
        actual = inferencer.predict(image)
        with torch.no_grad():
            expected = model(image[None])
        assert np.asarray(actual.anomaly_map).squeeze().shape == (height, width)
        np.testing.assert_allclose(
            np.asarray(actual.anomaly_map).squeeze(), expected.anomaly_map.squeeze().numpy(), atol=1e-4, rtol=0
        )
        np.testing.assert_allclose(np.asarray(actual.pred_score).squeeze(), expected.pred_score.numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["fp16", "int8", "int8_ptq"])
def test_compressed_dynamic_graphs_give_each_map_at_its_input_size(
    name: str, exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    inferencer = OpenVINOInferencer(exports[name], device="CPU", config=FP32)
    fp32 = OpenVINOInferencer(exports["fp32"], device="CPU", config=FP32)
    generator = torch.Generator().manual_seed(1)
    for height, width in THREE_SIZES:
        image = torch.rand(3, height, width, generator=generator)
        actual, reference = (np.asarray(model.predict(image).anomaly_map).squeeze() for model in (inferencer, fp32))
        assert actual.shape == (height, width)
        assert np.corrcoef(actual.ravel(), reference.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("name", ["fp32", "fp32_fixed", "onnx"])
def test_fp32_export_matches_pytorch(name: str, openvino: dict, pytorch: dict) -> None:
    for kind in ("train", "unseen"):
        expected, actual = maps(pytorch[kind]), maps(openvino[name][kind])
        assert actual.shape == expected.shape == (len(pytorch[kind]), SIZE, SIZE)
        assert actual.min() >= 0 and actual.max() <= 1  # normalised by anomalib's post-processing
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(scores(openvino[name][kind]), scores(pytorch[kind]), atol=1e-4, rtol=0)
    assert labels(openvino[name]["unseen"]) == labels(pytorch["unseen"])
    # The test images set the thresholds, so a score can sit exactly on one (0.5 once normalised), where
    # rounding decides the label; all others agree.
    clear = [abs(score - 0.5) > 1e-4 for score in scores(pytorch["train"]).tolist()]
    agree = [a == b for a, b in zip(labels(openvino[name]["train"]), labels(pytorch["train"]), strict=True)]
    assert all(same for same, away in zip(agree, clear, strict=True) if away)


def test_fp16_maps_correlate_with_fp32(openvino: dict, pytorch: dict, exports: dict[str, Path]) -> None:
    for kind in ("train", "unseen"):
        correlation = np.corrcoef(maps(openvino["fp16"][kind]).ravel(), maps(pytorch[kind]).ravel())[0, 1]
        assert correlation >= 0.999
    weights = {name: exports[name].with_suffix(".bin").stat().st_size for name in ("fp32", "fp16")}
    assert weights["fp16"] < 0.55 * weights["fp32"]


# The largest loss of image AUROC against FP32 allowed, and the smallest Spearman correlation of image scores.
# Measured with these fixtures over the 70 images, five models trained without a seed (CPU with AMX and AVX-512):
# INT8 weights lost at most 0.001 (correlation 0.9999); INT8 PTQ, which also quantises the teacher's activations,
# lost 0.015-0.031 (correlation 0.966-0.990).
INT8_BOUNDS = {"int8": (0.01, 0.99), "int8_ptq": (0.05, 0.9)}


@pytest.mark.parametrize("name", ["int8", "int8_ptq"])
def test_int8_keeps_image_auroc(name: str, openvino: dict, images: dict[str, list[Path]], exports: dict) -> None:
    # All 70 test images (28 good, 42 defective): one pair ranked the other way moves AUROC by 0.001.
    paths = images["train"] + images["unseen"]
    fp32, int8 = (openvino[key]["train"] + openvino[key]["unseen"] for key in ("fp32", name))
    assert auroc(fp32, paths) > 0.75  # a model that separates the classes, so that the comparison means something
    largest_loss, smallest_correlation = INT8_BOUNDS[name]
    assert auroc(fp32, paths) - auroc(int8, paths) <= largest_loss
    assert spearmanr(scores(fp32), scores(int8)).statistic >= smallest_correlation
    weights = {key: exports[key].with_suffix(".bin").stat().st_size for key in ("fp32", name)}
    assert weights[name] < 0.35 * weights["fp32"]  # the teacher's weights, nearly all of them, in 8 bits


def test_int8_ptq_quantises_the_teacher_but_not_its_attention(exports: dict[str, Path]) -> None:
    model = ov.Core().read_model(exports["int8_ptq"])
    quantisers = [operation for operation in model.get_ops() if operation.get_type_name() == "FakeQuantize"]
    assert quantisers
    consumers = {
        target.get_node().get_type_name()
        for quantiser in quantisers
        for target in quantiser.output(0).get_target_inputs()
    }
    assert "ScaledDotProductAttention" not in consumers


def test_onnx_graph_holds_pre_processing_model_and_post_processing(exports: dict[str, Path]) -> None:
    graph = onnx.load(str(exports["onnx"]), load_external_data=False).graph
    scopes = " ".join(
        entry.value for node in graph.node for entry in node.metadata_props if entry.key == "pkg.torch.onnx.name_scopes"
    )
    for part in ("pre_processor", "model.teacher", "model.forward_student", "model.backward_student",
                 "model.anomaly_map_generator", "post_processor"):  # fmt: skip
        assert f"'{part}" in scopes, part
    assert {output.name for output in graph.output} == {"pred_score", "pred_label", "anomaly_map", "pred_mask"}


def test_graph_holds_only_what_inference_needs(exports: dict[str, Path], checkpoint: Path) -> None:
    graph = onnx.load(str(exports["onnx"]), load_external_data=False).graph
    attention_blocks = sum(node.op_type == "Softmax" for node in graph.node)  # one per block, none elsewhere
    assert attention_blocks == max(LAYERS) + 1  # no block beyond the deepest layer used

    # The weights are the pruned teacher's and the students', nothing else (no head, no training branch);
    # OpenVINO folds a few small constants (layer scales, prefix-token embeddings) into others.
    model = TransformerStudent.load_from_checkpoint(checkpoint).model
    parameters = sum(parameter.numel() for parameter in model.parameters())
    weights = exports["fp32"].with_suffix(".bin").stat().st_size
    assert 0.98 * 4 * parameters <= weights <= 1.01 * 4 * parameters
    backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False)
    assert weights < 0.6 * 4 * sum(parameter.numel() for parameter in backbone.parameters())


def test_export_at_445_by_517_pads_resizes_and_matches_pytorch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-square input off the patch grid: edge-padded to a square and resized to the model's 448 in the graph."""
    monkeypatch.chdir(tmp_path)
    model = small_model(image_size=448, layers=(0, 1))
    path = model.eval().to_openvino(tmp_path / "export", input_size=(445, 517))
    shape = ov.Core().read_model(path).input(0).get_partial_shape()
    assert [shape[2].get_length(), shape[3].get_length()] == [445, 517]

    images = torch.rand(2, 3, 445, 517, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
    inferencer = OpenVINOInferencer(path, device="CPU", config=FP32)
    for image, expected_map in zip(images, expected.anomaly_map, strict=True):
        actual = inferencer.predict(image)
        assert actual.anomaly_map.shape[-2:] == (445, 517)
        np.testing.assert_allclose(actual.anomaly_map.squeeze(), expected_map.squeeze().numpy(), atol=1e-4, rtol=0)


def test_tiled_export_tiles_in_the_graph_and_matches_pytorch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiled model exports as one graph: pad, cut into 6 tiles, one teacher batch, stitch, smooth, post-process.

    Eager, the teacher takes the tiles in chunks of ``tile_batch_size``; the graph runs them in one batch.
    """
    monkeypatch.chdir(tmp_path)
    model = small_model(layers=(0, 1), tiling={"tile_size": 112, "tile_overlap": 14, "tile_batch_size": 4})
    assert model.tiling.layout(130, 250).count == 6
    path = model.eval().to_openvino(tmp_path / "export", input_size=(130, 250))
    operations = [operation.get_type_name() for operation in ov.Core().read_model(path).get_ops()]
    assert operations.count("ScaledDotProductAttention") == 2  # blocks 0 and 1, once: not one teacher per chunk

    images = torch.rand(2, 3, 130, 250, generator=torch.Generator().manual_seed(0))
    with TeacherCalls(model) as teacher, torch.no_grad():
        expected = model(images)  # the exported forward, run eagerly
    assert teacher.batches == [4, 4, 4]  # the 6 tiles of each of the 2 images, in chunks of 4
    inferencer = OpenVINOInferencer(path, device="CPU", config=FP32)
    for image, expected_map, expected_score in zip(images, expected.anomaly_map, expected.pred_score, strict=True):
        actual = inferencer.predict(image)
        assert actual.anomaly_map.shape[-2:] == (130, 250)
        np.testing.assert_allclose(actual.anomaly_map.squeeze(), expected_map.squeeze().numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(actual.pred_score.squeeze(), expected_score.numpy(), atol=1e-4, rtol=0)


def test_calibrated_int8_needs_data_and_a_validated_model(checkpoint: Path, data: dict, tmp_path: Path) -> None:
    trained = TransformerStudent.load_from_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="calibrates on images: pass a datamodule"):
        trained.to_openvino(tmp_path, input_size=(SIZE, SIZE), compression_type="int8_ptq")
    untrained = small_model(image_size=SIZE)
    datamodule = make_datamodule(data["train"], batch_size=32)  # anomalib's default batch sizes
    with pytest.raises(ValueError, match="needs a trained and validated model"):
        untrained.to_openvino(tmp_path, input_size=(SIZE, SIZE), compression_type="int8_ptq", datamodule=datamodule)
    assert not (tmp_path / "weights").exists()


def test_untrained_model_exports_with_a_warning(checkpoint: Path, tmp_path: Path, caplog) -> None:
    untrained = small_model(image_size=SIZE)
    with caplog.at_level(logging.WARNING):
        assert untrained.to_torch(tmp_path / "untrained").exists()
    assert "raw, unnormalised scores" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        TransformerStudent.load_from_checkpoint(checkpoint).to_torch(tmp_path / "trained")
    assert "unnormalised" not in caplog.text
