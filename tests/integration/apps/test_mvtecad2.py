"""MVTec AD 2 end to end on a generated tree in the dataset's layout, under the installed pandas.

anomalib's ``MVTecAD2`` datamodule reads it; `anomalib train` with ``configs/mvtecad2.yaml`` fits in tiles and
tests on a private test set; the Python API tests on all three test sets; the good-image quantile thresholds
are checked against the raw validation scores, after a checkpoint round trip and in the OpenVINO export;
`anomalib test` with the config and `transformer-student evaluate --dataset mvtecad2` report AU-PRO at FPR 0.05
and SegF1; `transformer-student predict-mvtecad2` writes full-size maps and masks, for images of two sizes.
Images are 56 x 112 px, inspected in 56-px tiles (two per image) by a random ViT-S/14.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from anomalib.data import MVTecAD2
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer
from lightning.pytorch import seed_everything
from PIL import Image

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps import cli, mvtecad2_submission
from anomalib_transformer_student.apps.evaluate import evaluate_checkpoint
from anomalib_transformer_student.model.post_processing import QuantilePostProcessor

from ...factories import make_engine, small_model
from ...helpers import SMALL_TEACHER, checkpoints, run_cli

CONFIG = Path(__file__).parents[3] / "configs" / "mvtecad2.yaml"
CATEGORY = "sheet_metal"
HEIGHT, WIDTH, SIZE = 56, 112, 56
COUNTS = {"train/good": 4, "validation/good": 6, "test_public/good": 2, "test_public/bad": 2,
          "test_private": 3, "test_private_mixed": 3}  # fmt: skip
IMAGE_QUANTILE, PIXEL_QUANTILE = 0.5, 0.99
POST_PROCESSOR = "anomalib_transformer_student.model.post_processing.QuantilePostProcessor"
SMALL = ["--model.pretrained", "false", "--model.teacher", SMALL_TEACHER, "--model.image_size", str(SIZE),
         "--model.tiling.tile_size", str(SIZE)]  # fmt: skip


def _image(rng: np.random.Generator) -> np.ndarray:
    return (128 + 20 * rng.standard_normal((HEIGHT, WIDTH, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec AD 2's layout: train/good, validation/good, test_public/{good,bad,ground_truth/bad}, two private sets."""
    root = tmp_path_factory.mktemp("mvtec_ad_2")
    rng = np.random.default_rng(0)
    for folder, count in COUNTS.items():
        (root / CATEGORY / folder).mkdir(parents=True)
        for index in range(count):
            image = _image(rng)
            name = f"{index:03d}_{'mixed' if folder == 'test_private_mixed' else 'regular'}.png"  # MVTec's names
            if folder == "test_public/bad":
                mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
                mask[20:24, 70:74] = 255
                image[mask > 0] = 255
                masks = root / CATEGORY / "test_public" / "ground_truth" / "bad"
                masks.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(masks / f"{index:03d}_regular_mask.png")
            Image.fromarray(image).save(root / CATEGORY / folder / name)
    return root


def test_every_split_and_test_set_loads(tree: Path) -> None:
    """Good images' missing mask paths must not reach anomalib's path check as NaN (pandas 3)."""
    datamodule = MVTecAD2(root=tree, category=CATEGORY, num_workers=0)
    datamodule.setup()
    datasets = {
        "train": datamodule.train_data,
        "val": datamodule.val_data,
        "public": datamodule.test_public_data,
        "private": datamodule.test_private_data,
        "private_mixed": datamodule.test_private_mixed_data,
    }
    sizes = {name: len(dataset) for name, dataset in datasets.items()}
    assert sizes == {"train": 4, "val": 6, "public": 4, "private": 3, "private_mixed": 3}
    for name, dataset in datasets.items():
        items = [dataset[index] for index in range(len(dataset))]
        for item in items:
            if name == "public" and "/bad/" in item.image_path:
                assert item.mask_path.endswith("_mask.png") and int(item.gt_mask.sum()) == 16
            else:
                assert item.mask_path is None
        if name.startswith("private"):
            assert all(item.gt_label is None and item.gt_mask is None for item in items)


@pytest.fixture(scope="module")
def cli_run(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`anomalib train` with the MVTec AD 2 config, tiles of 56 px, tested on test_private_mixed."""
    workdir = tmp_path_factory.mktemp("cli_mvtecad2")
    result = run_cli(
        ["train", "--config", str(CONFIG), *SMALL, "--model.lr", "1e-3",
         "--model.post_processor.init_args.image_quantile", str(IMAGE_QUANTILE),
         "--model.post_processor.init_args.pixel_quantile", str(PIXEL_QUANTILE),
         "--data.root", str(tree), "--data.num_workers", "0", "--data.train_batch_size", "2",
         "--data.test_type", "private_mixed", "--trainer.max_epochs", "1",
         "--model.feature_cache.dir", str(workdir / "cache"),
         "--default_root_dir", str(workdir / "results")],
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "inspected in 56-px tiles" in output
    assert "QuantilePostProcessor" in output
    assert "does not contain any anomalous images" not in output  # anomalib's fallback was not used
    written = sorted(path.name for path in (workdir / "results").rglob("test_private_mixed/*.png"))
    assert written == sorted(path.name for path in (tree / CATEGORY / "test_private_mixed").glob("*.png"))
    (checkpoint,) = checkpoints(workdir / "results")
    return checkpoint


def _raw(model: TransformerStudent, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Raw (not post-processed) scores and maps of ``paths`` by the model's export forward."""
    post_processor, model.post_processor = model.post_processor, None
    try:
        with torch.no_grad():
            outputs = [model.eval()(read_image(path, as_tensor=True)[None]) for path in paths]
    finally:
        model.post_processor = post_processor
    scores = np.array([float(output.pred_score) for output in outputs])
    return scores, np.stack([output.anomaly_map.squeeze().numpy() for output in outputs])


@pytest.mark.slow
def test_cli_thresholds_are_quantiles_of_good_validation_images(cli_run: Path, tree: Path) -> None:
    """Loaded from the checkpoint, the thresholds are the quantiles of the raw validation scores and pixels."""
    model = TransformerStudent.load_from_checkpoint(cli_run)
    assert type(model.post_processor).__name__ == "PostProcessor"  # anomalib rebuilds its default ...
    post_processor = model.post_processor  # ... and the buffers carry the thresholds
    scores, maps = _raw(model, sorted((tree / CATEGORY / "validation" / "good").glob("*.png")))
    expected_image = np.quantile(scores, IMAGE_QUANTILE, method="inverted_cdf")
    assert float(post_processor.image_threshold) == pytest.approx(expected_image, rel=1e-5)
    assert float(post_processor.image_threshold) < scores.max()  # not anomalib's fallback
    expected_pixel = np.quantile(maps, PIXEL_QUANTILE, method="inverted_cdf")
    pixel_threshold = float(post_processor.pixel_threshold)
    assert expected_pixel * (1 - 1e-5) <= pixel_threshold <= expected_pixel * (1 + 2**-11 + 1e-5)
    assert (maps > pixel_threshold).mean() <= 1 - PIXEL_QUANTILE
    assert pixel_threshold < maps.max()


@pytest.mark.slow
def test_python_api_on_all_three_test_sets_and_export(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fit with the Python API; test on public, private and private_mixed; export; labels follow the thresholds."""
    seed_everything(0)
    model = small_model(
        image_size=SIZE,
        layers=(0, 1),  # two blocks: a small graph to export
        tiling={"tile_size": SIZE},
        lr=1e-3,
        feature_cache={"dir": str(tmp_path / "cache")},
        post_processor=QuantilePostProcessor(image_quantile=IMAGE_QUANTILE, pixel_quantile=PIXEL_QUANTILE),
        visualizer=False,
    )
    engine = make_engine(tmp_path / "api")
    datamodule = MVTecAD2(root=tree, category=CATEGORY, num_workers=0, train_batch_size=2, eval_batch_size=2)
    engine.fit(model, datamodule=datamodule)
    (public,) = engine.test(model, datamodule=datamodule, verbose=False)
    assert {"image_AUROC", "image_F1Score"} <= set(public) and not math.isnan(public["image_AUROC"])
    for test_type in ("private", "private_mixed"):
        private = MVTecAD2(root=tree, category=CATEGORY, num_workers=0, eval_batch_size=2, test_type=test_type)
        predictions = [item for batch in engine.predict(model, datamodule=private) for item in batch]
        assert len(predictions) == COUNTS[f"test_{test_type}"]
        assert all(
            item.anomaly_map.shape[-2:] == (HEIGHT, WIDTH) and item.pred_mask is not None for item in predictions
        )

    # Eager and exported, a raw score above the image threshold is a positive label, a raw pixel above the
    # pixel threshold a positive mask pixel.
    post_processor = model.post_processor
    image_threshold, pixel_threshold = float(post_processor.image_threshold), float(post_processor.pixel_threshold)
    paths = sorted((tree / CATEGORY / "test_public").rglob("*_regular.png"))
    scores, maps = _raw(model, paths)
    monkeypatch.chdir(tmp_path)  # the inferencer writes its cache into the current folder
    exported = model.to_openvino(tmp_path / "export", input_size=(HEIGHT, WIDTH))
    inferencer = OpenVINOInferencer(exported, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    for path, score, anomaly_map in zip(paths, scores, maps, strict=True):
        with torch.no_grad():
            eager = model.eval()(read_image(path, as_tensor=True)[None])
        deployed = inferencer.predict(path)
        for prediction in (eager, deployed):
            assert bool(np.asarray(prediction.pred_label).item()) == (score > image_threshold)
            far = np.abs(anomaly_map - pixel_threshold) > 1e-4 * abs(pixel_threshold)  # leave out near-ties
            mask = np.asarray(prediction.pred_mask).reshape(anomaly_map.shape)
            assert np.array_equal(mask[far], (anomaly_map > pixel_threshold)[far])


@pytest.mark.slow
def test_config_and_evaluate_report_aupro_at_fpr_005_and_segf1(cli_run: Path, tree: Path, tmp_path: Path) -> None:
    """MVTec AD 2's metrics on test_public: from `anomalib test --config` and from the evaluate command."""
    result = run_cli(
        ["test", "--config", str(CONFIG), *SMALL, "--data.root", str(tree), "--data.num_workers", "0",
         "--data.test_type", "public", "--ckpt_path", str(cli_run),
         "--model.feature_cache.dir", str(tmp_path / "cache"),
         "--default_root_dir", str(tmp_path / "results")],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "pixel_AUPRO_fpr0.05" in output and "pixel_F1Score" in output

    evaluated = evaluate_checkpoint(cli_run, tree, CATEGORY, batch_size=2, output=tmp_path / "evaluate",
                                    dataset="mvtecad2")  # fmt: skip
    metrics = evaluated.metrics
    assert {"image_AUROC", "image_F1Score", "pixel_F1Score", "pixel_AUPRO_fpr0.05"} <= set(metrics)
    assert 0 <= metrics["pixel_AUPRO_fpr0.05"] <= 1 and 0 <= metrics["pixel_F1Score"] <= 1


@pytest.mark.slow
def test_predict_private_test_sets_full_size_with_two_image_sizes(
    cli_run: Path, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Maps (float16 TIFF) are the raw maps at each image's own size; masks (PNG 0/255) the raw map > threshold."""
    monkeypatch.setattr(mvtecad2_submission, "IMAGE_COUNTS", {**mvtecad2_submission.IMAGE_COUNTS, CATEGORY: 3})
    root = tmp_path / "data"
    for split in ("test_private", "test_private_mixed"):
        shutil.copytree(tree / CATEGORY / split, root / CATEGORY / split)
    other = (HEIGHT + 28, WIDTH - 14)  # a second size in the category, not a multiple of the tile
    pixels = np.random.default_rng(1).integers(100, 160, (*other, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / CATEGORY / "test_private" / "002_regular.png")
    output = tmp_path / "submission"
    status = cli.main(["predict-mvtecad2", "--ckpt", str(cli_run), "--data-root", str(root), "--category", CATEGORY,
                       "--output", str(output)])  # fmt: skip
    assert status == 0
    assert not (tmp_path / "submission.tar.gz").exists()  # one category of 8: not packed yet

    model = TransformerStudent.load_from_checkpoint(cli_run)
    threshold = float(model.post_processor.pixel_threshold)
    sizes = set()
    for split in ("test_private", "test_private_mixed"):
        images = sorted((root / CATEGORY / split).glob("*.png"))
        maps = sorted((output / "anomaly_images" / CATEGORY / split).iterdir())
        assert [path.name for path in maps] == [path.with_suffix(".tiff").name for path in images]
        for image in images:
            stored = tifffile.imread(output / "anomaly_images" / CATEGORY / split / image.with_suffix(".tiff").name)
            mask = np.asarray(Image.open(output / "anomaly_images_thresholded" / CATEGORY / split / image.name))
            _, (raw,) = _raw(model, [image])
            assert (
                stored.dtype == np.float16 and stored.shape == mask.shape == raw.shape == Image.open(image).size[::-1]
            )
            assert np.allclose(stored, raw, rtol=2e-3, atol=1e-4)
            assert set(np.unique(mask)) <= {0, 255}
            far = np.abs(raw - threshold) > 1e-4 * abs(threshold)
            assert np.array_equal((mask == 255)[far], (raw > threshold)[far])
            sizes.add(raw.shape)
    assert sizes == {(HEIGHT, WIDTH), other}
