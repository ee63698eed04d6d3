"""A DINOv3 teacher through every stage: fit with the feature cache, test, predict, tiling, reload and export.

The teacher's weights come from a file in the official DINOv3 layout (random, written by the test), so that
the conversion runs where users meet it. One small fit serves every stage; the teacher stops at block 3, which
keeps the export short (the default layers, blocks 7 and 11, are the unit tests' concern).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import PredictDataset
from anomalib.data.utils import read_image
from anomalib.deploy import ExportType, OpenVINOInferencer
from lightning.pytorch import seed_everything

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.training.teacher_weights import teacher_state_dict

from ...factories import TeacherCalls, make_datamodule, make_engine
from ...helpers import checkpoints, run_cli
from ...unit.model.test_dinov3_teacher import official_layout, random_source

pytestmark = pytest.mark.slow

TEACHER = "vit_small_patch16_dinov3"
IMAGE_SIZE = 64  # 4 x 4 patches of 16 px; the demo images are 112 x 112
LAYERS = (1, 3)
TILE = 56  # 2 x 2 tiles of a demo image, a multiple of the teacher's 4 x 4 grid
FP32 = {"INFERENCE_PRECISION_HINT": "f32"}  # CPUs with bf16 units would otherwise compute an FP32 graph in bf16


@pytest.fixture(scope="module")
def fitted(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two epochs (validation after each) and a test, counting the images the teacher sees."""
    root = tmp_path_factory.mktemp("dinov3")
    weights = root / "dinov3_vits16_pretrain_lvd1689m.pth"
    torch.save(official_layout(random_source(TEACHER).state_dict()), weights)
    seed_everything(0)
    model = TransformerStudent(
        teacher=TEACHER,
        teacher_weights=str(weights),
        layers=LAYERS,
        image_size=IMAGE_SIZE,
        lr=1e-3,
        feature_cache={"dir": str(root / "cache")},
    )
    datamodule = make_datamodule(demo_root)
    trainer = make_engine(root / "results", max_epochs=2)
    # Removed on exit: export traces the teacher, and a hook reading the batch size would fix it in the graph.
    with TeacherCalls(model) as seen:
        trainer.fit(model, datamodule=datamodule)
        seen_in_fit = seen.images
        (metrics,) = trainer.test(model, datamodule=datamodule)
    return {
        "model": model, "engine": trainer, "weights": weights, "root": root, "metrics": metrics,
        "seen": {"fit": seen_in_fit, "test": seen.images - seen_in_fit},
    }  # fmt: skip


def test_fit_caches_features_and_test_reuses_them(fitted: dict, demo_root: Path) -> None:
    model = fitted["model"]
    assert len(model.model.teacher.backbone.blocks) == max(LAYERS) + 1
    converted = teacher_state_dict(TEACHER, str(fitted["weights"]))
    assert torch.equal(model.model.teacher.backbone.patch_embed.proj.weight, converted["patch_embed.proj.weight"])
    n_train = len(list((demo_root / "brick" / "train").rglob("*.png")))
    n_test = len(list((demo_root / "brick" / "test").rglob("*.png")))
    # Each image once: the second epoch trains and validates from the cache, and the test reuses the validation's.
    assert fitted["seen"] == {"fit": n_train + n_test, "test": 0}
    assert 0.0 <= fitted["metrics"]["image_AUROC"] <= 1.0
    assert 0.0 <= fitted["metrics"]["pixel_AUROC"] <= 1.0


def test_predict_whole_and_in_tiles_after_reload(fitted: dict, demo_root: Path) -> None:
    folder = demo_root / "brick" / "test" / "good"
    (checkpoint,) = checkpoints(fitted["root"] / "results")
    fitted["weights"].rename(fitted["weights"].with_suffix(".moved"))  # the final checkpoint holds the teacher
    reloaded = TransformerStudent.load_from_checkpoint(checkpoint).eval()
    image = read_image(next(folder.glob("*.png")), as_tensor=True)[None]
    with torch.no_grad():
        expected, actual = fitted["model"].eval()(image), reloaded(image)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=1e-6, rtol=0)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=1e-6, rtol=0)

    (batch, *_) = fitted["engine"].predict(reloaded, dataset=PredictDataset(folder))
    assert batch.anomaly_map.shape[-2:] == (112, 112)

    tiled = TransformerStudent.load_from_checkpoint(checkpoint, tiling={"tile_size": TILE})
    assert tiled.tiling.layout(112, 112).count == 4
    tiles = TeacherCalls(tiled)
    (batch, *_) = fitted["engine"].predict(tiled, dataset=PredictDataset(folder))
    assert batch.anomaly_map.shape[-2:] == (112, 112)
    assert tiles.images == 4 * len(list(folder.glob("*.png")))


@pytest.mark.parametrize("input_size", [(112, 112), None], ids=["fixed-size", "any-size"])
def test_openvino_export_answers_as_pytorch(
    input_size: tuple[int, int] | None, fitted: dict, demo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fitted["model"].eval()
    name = "any" if input_size is None else "fixed"
    exported = fitted["engine"].export(
        model, ExportType.OPENVINO, export_root=fitted["root"] / f"export_{name}", input_size=input_size
    )
    monkeypatch.chdir(fitted["root"])  # the inferencer writes its cache folder here
    inferencer = OpenVINOInferencer(exported, device="CPU", config=FP32)
    for index, path in enumerate(sorted((demo_root / "brick" / "test").rglob("*.png"))[:3]):
        image = read_image(path, as_tensor=True)
        if input_size is None and index:  # the graph for any size: also a non-square crop and an enlargement
            image = image[:, :90, :70] if index == 1 else torch.nn.functional.interpolate(image[None], (150, 130))[0]
        with torch.no_grad():
            expected = model(image[None])
        actual = inferencer.predict(image)
        np.testing.assert_allclose(
            np.asarray(actual.anomaly_map, dtype=np.float32).squeeze(), expected.anomaly_map.squeeze().numpy(),
            atol=1e-4, rtol=0,
        )  # fmt: skip
        assert abs(float(np.asarray(actual.pred_score).squeeze()) - float(expected.pred_score)) <= 1e-4


def test_cli_names_a_model_that_cannot_teach_and_the_families(tmp_path: Path) -> None:
    """Before: a DINOv3 teacher failed with ``AssertionError: feature shape must be cached on create``."""
    result = run_cli(
        ["fit", "--model", "TransformerStudent", "--model.teacher", "resnet18", "--model.pretrained", "false",
         "--data", "anomalib.data.MVTecAD", "--data.root", str(tmp_path / "data")],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())  # the CLI's console wraps long lines
    assert "Teacher 'resnet18' cannot serve as the teacher: timm builds it as a ResNet" in output
    assert "DINOv3 (e.g. 'vit_base_patch16_dinov3.lvd1689m'" in output
    assert "AssertionError" not in output
