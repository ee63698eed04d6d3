"""Bad training data fails clearly before any training, through the Python API and the anomalib CLI.

Each test breaks its own copy of the generated dataset: truncated and non-image files, an empty
training folder, masks of the wrong size, 16-bit grayscale images that anomalib would clip; and
odd but usable files (grayscale, RGBA, 16-bit RGB, tiny and 20:1 images), which must train.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from anomalib.data.utils import read_image
from PIL import Image

from anomalib_transformer_student.training.data_checks import (
    ClippedImageError,
    CorruptImageError,
    DataChecks,
    EmptyTrainingSetError,
    ImageTooLargeError,
    MaskSizeError,
)

from ...factories import make_datamodule, make_engine, small_model
from ...helpers import SMALL_TEACHER, anomalib_cli, data_args, run_cli

# A 4-block teacher at 56 px: the checks run before the teacher matters, and training stays cheap.
MODEL_KWARGS = {"layers": (1, 3), "feature_cache": False}  # with small_model's random teacher at 56 px
CLI_MODEL_ARGS = [
    "--model", "TransformerStudent",
    "--model.pretrained", "false",
    "--model.teacher", SMALL_TEACHER,
    "--model.image_size", "56",
    "--model.layers", "[1, 3]",
    "--model.feature_cache", "false",
]  # fmt: skip
CHECKS_LOGGER = "anomalib_transformer_student.training.data_checks"


@pytest.fixture
def root(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the generated dataset, free to break."""
    shutil.copytree(demo_root / "brick", tmp_path / "data" / "brick")
    return tmp_path / "data"


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _break_training_images(root: Path) -> list[Path]:
    """A truncated PNG and a text file named like an image."""
    train = root / "brick" / "train" / "good"
    (train / "100.png").write_text("not an image")
    return [_truncate(train / "003.png"), train / "100.png"]


def _clip_prone_image(root: Path) -> Path:
    """A 16-bit grayscale PNG using the full 16-bit range (anomalib's reader clips it to 255)."""
    path = root / "brick" / "train" / "good" / "000.png"
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(path)
    return path


def _resize_mask(root: Path) -> tuple[Path, Path]:
    image, mask = (
        root / "brick" / "test" / "stain" / "000.png",
        root / "brick" / "ground_truth" / "stain" / "000_mask.png",
    )
    Image.open(mask).resize((100, 90)).save(mask)
    return image, mask


def _empty_training_folder(root: Path) -> Path:
    train = root / "brick" / "train" / "good"
    for path in train.iterdir():
        path.unlink()
    return train


def _add_odd_images(root: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Grayscale, RGBA, 16-bit RGB, tiny and 20:1 training images, each with the 8-bit RGB it must read as.

    A 20:1 defective test image with its mask is added as well.
    """
    train = root / "brick" / "train" / "good"
    rgb = np.asarray(Image.open(train / "000.png").convert("RGB"))
    gray = np.asarray(Image.open(train / "001.png").convert("L"))
    wide = np.asarray(Image.fromarray(rgb).resize((560, 28)))
    odd = {
        "gray": (train / "100_gray.png", np.repeat(gray[..., None], 3, axis=-1)),
        "rgba": (train / "101_rgba.png", rgb),
        "rgb16": (train / "102_rgb16.png", rgb),
        "tiny": (train / "103_tiny.png", rgb[:10, :10]),
        "wide": (train / "104_wide.png", wide),
    }
    Image.fromarray(gray).save(odd["gray"][0])
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(odd["rgba"][0])
    cv2.imwrite(str(odd["rgb16"][0]), (rgb[..., ::-1].astype(np.uint16) * 257))  # 48-bit PNG, BGR order
    Image.fromarray(rgb[:10, :10].copy()).save(odd["tiny"][0])
    Image.fromarray(wide).save(odd["wide"][0])
    # A 20:1 defective test image and its mask.
    mask = np.zeros((28, 560), dtype=np.uint8)
    mask[10:18, 300:320] = 255
    defective = wide.copy()
    defective[mask > 0] = (255, 0, 255)
    Image.fromarray(defective).save(root / "brick" / "test" / "stain" / "100.png")
    Image.fromarray(mask).save(root / "brick" / "ground_truth" / "stain" / "100_mask.png")
    return odd


# ---------------------------------------------------------------------------------------------- Python API


def test_corrupt_training_images_fail_before_training_naming_every_file(root: Path, tmp_path: Path) -> None:
    bad = _break_training_images(root)
    engine = make_engine(tmp_path / "results")
    with pytest.raises(CorruptImageError, match="2 file") as error:
        engine.fit(small_model(**MODEL_KWARGS), datamodule=make_datamodule(root))
    message = str(error.value)
    for path in bad:
        assert str(path) in message
    assert "truncated" in message
    assert "skip_corrupt_images" in message
    assert engine.trainer.global_step == 0  # not a single batch was trained


def test_skip_corrupt_images_warns_once_listing_every_skipped_file(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _break_training_images(root)
    datamodule = make_datamodule(root)
    engine = make_engine(tmp_path / "results", callbacks=[DataChecks(skip_corrupt_images=True)])
    with caplog.at_level(logging.WARNING, logger=CHECKS_LOGGER):
        engine.fit(small_model(**MODEL_KWARGS), datamodule=datamodule)
    warnings = [record.getMessage() for record in caplog.records if "Skipped" in record.getMessage()]
    assert len(warnings) == 1
    assert all(str(path) in warnings[0] for path in bad)
    assert sorted(Path(path).name for path in datamodule.train_data.samples.image_path) == [
        f"{index:03d}.png" for index in range(8) if index != 3
    ]
    assert engine.trainer.global_step == 2  # 7 images, batches of 4


def test_a_datachecks_given_to_the_trainer_keeps_its_skip_setting(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lightning replaces a trainer's callback by the module's of the same type: the user's setting must survive."""
    bad = _break_training_images(root)
    engine = make_engine(tmp_path / "results", callbacks=[DataChecks(skip_corrupt_images=True)])
    with caplog.at_level(logging.WARNING, logger=CHECKS_LOGGER):
        engine.fit(small_model(**MODEL_KWARGS), datamodule=make_datamodule(root))
    warnings = [record.getMessage() for record in caplog.records if "Skipped" in record.getMessage()]
    assert len(warnings) == 1
    assert all(str(path) in warnings[0] for path in bad)
    assert engine.trainer.global_step == 2  # 7 images, batches of 4
    (checks,) = [callback for callback in engine.trainer.callbacks if isinstance(callback, DataChecks)]
    assert checks.input_size == 56  # the module's checks, with its geometry, run once


def test_an_image_over_pils_pixel_limit_is_not_called_corrupt_nor_skipped(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL refuses images over twice ``MAX_IMAGE_PIXELS`` (about 179 MP); a low limit stands for a huge image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # refused above 40,000 px; the others are 112 x 112
    large = root / "brick" / "train" / "good" / "100_large.png"
    Image.new("RGB", (250, 250), (120, 80, 40)).save(large)
    model = small_model(**MODEL_KWARGS)
    engine = make_engine(tmp_path / "results", callbacks=[DataChecks(skip_corrupt_images=True)])

    with pytest.raises(ImageTooLargeError) as error:
        engine.fit(model, datamodule=make_datamodule(root))

    message = str(error.value)
    assert str(large) in message
    assert "twice PIL.Image.MAX_IMAGE_PIXELS = 20,000" in message
    assert "they are not corrupt" in message
    assert "PIL.Image.MAX_IMAGE_PIXELS = None" in message
    assert "tile_size" in message
    assert "cannot be read" not in message
    assert engine.trainer.global_step == 0


def test_grayscale_rgba_16bit_tiny_and_elongated_images_train_and_predict(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    odd = _add_odd_images(root)
    for path, expected in odd.values():  # anomalib reads every one as the 8-bit RGB it stands for
        np.testing.assert_array_equal(np.round(read_image(path) * 255).astype(np.uint8), expected)
    # One image per evaluation batch: anomalib resizes a batch of mixed sizes to its largest image.
    datamodule = make_datamodule(root, eval_batch_size=1, val_split_mode="same_as_test")
    model = small_model(**MODEL_KWARGS)
    engine = make_engine(tmp_path / "results")
    with caplog.at_level(logging.WARNING, logger=CHECKS_LOGGER):
        engine.fit(model, datamodule=datamodule)
    log = caplog.text
    assert "thinner than one 14-px patch" in log
    assert str(odd["wide"][0]) in log  # 560x28 -> 56x3 px
    assert str(odd["tiny"][0]) not in log  # upsampled, not thin
    assert "sizes" in log  # training images of mixed sizes
    assert engine.trainer.global_step == 4  # 13 images, batches of 4
    assert all(torch.isfinite(parameter).all() for parameter in model.model.forward_student.parameters())

    predictions = engine.predict(model, dataloaders=datamodule.test_dataloader())
    by_name = {Path(item.image_path).name: item for batch in predictions for item in batch}
    wide = by_name["100.png"]
    assert tuple(wide.anomaly_map.shape[-2:]) == (28, 560)  # the map at the image's own size
    assert all(math.isfinite(float(item.pred_score)) for item in by_name.values())


def test_16bit_grayscale_that_anomalib_would_clip_is_refused(root: Path, tmp_path: Path) -> None:
    path = _clip_prone_image(root)
    with pytest.raises(ClippedImageError, match=re.escape(str(path))) as error:
        make_engine(tmp_path / "results").fit(small_model(**MODEL_KWARGS), datamodule=make_datamodule(root))
    assert "divide by 257" in str(error.value)


def test_empty_training_folder_fails_naming_the_dataset(root: Path, tmp_path: Path) -> None:
    _empty_training_folder(root)
    with pytest.raises(EmptyTrainingSetError, match=r"MVTecAD\(root=.*category=brick\) is empty") as error:
        make_engine(tmp_path / "results").fit(small_model(**MODEL_KWARGS), datamodule=make_datamodule(root))
    assert "train/good" in str(error.value)


def test_mask_of_another_size_fails_naming_image_and_mask(root: Path, tmp_path: Path) -> None:
    image, mask = _resize_mask(root)
    engine = make_engine(tmp_path / "results")
    with pytest.raises(MaskSizeError) as error:
        engine.fit(small_model(**MODEL_KWARGS), datamodule=make_datamodule(root))
    assert f"image {image} is 112x112, mask {mask} is 100x90" in str(error.value)
    assert engine.trainer.global_step == 0


def test_test_stage_checks_its_own_data(root: Path, tmp_path: Path) -> None:
    """`engine.test` on its own (no fit before it) checks the test set too."""
    image, mask = _resize_mask(root)
    with pytest.raises(MaskSizeError, match=re.escape(f"image {image} is 112x112, mask {mask}")):
        make_engine(tmp_path / "results").test(small_model(**MODEL_KWARGS), datamodule=make_datamodule(root))


# ---------------------------------------------------------------------------------------------- anomalib CLI


def _cli_fit(root: Path, tmp_path: Path, *extra: str, subcommand: str = "fit") -> str:
    result = run_cli(
        [subcommand, *CLI_MODEL_ARGS, *data_args(root), *extra, "--trainer.max_epochs", "1",
         "--default_root_dir", str(tmp_path / "results")],
        cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    return f"exit {result.returncode}\n{output}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("breaker", "error"),
    [
        (_break_training_images, CorruptImageError),
        (_empty_training_folder, EmptyTrainingSetError),
        (_resize_mask, MaskSizeError),
        (_clip_prone_image, ClippedImageError),
    ],
    ids=["corrupt", "empty", "mask-size", "16-bit"],
)
def test_cli_refuses_bad_data_naming_the_files(
    breaker,
    error: type[Exception],
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    """anomalib's CLI (in this process; the console script's output is tested below) stops before training."""
    broken = breaker(root)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as raised:
        anomalib_cli(
            ["fit", *CLI_MODEL_ARGS, *data_args(root), "--trainer.max_epochs", "1",
             "--default_root_dir", str(tmp_path / "results")]
        )  # fmt: skip
    for path in broken if isinstance(broken, list | tuple) else [broken]:
        assert str(path) in str(raised.value)
    output = capfd.readouterr()
    assert "Epoch 0" not in output.out + output.err  # nothing was trained


@pytest.mark.slow
def test_cli_trains_on_odd_images_and_skips_corrupt_ones(root: Path, tmp_path: Path) -> None:
    bad = _break_training_images(root)
    odd = _add_odd_images(root)
    output = _cli_fit(
        root,
        tmp_path,
        "--trainer.callbacks+=anomalib_transformer_student.training.data_checks.DataChecks",
        "--trainer.callbacks.skip_corrupt_images=true",
        "--data.eval_batch_size",
        "1",
        subcommand="train",
    )
    assert output.startswith("exit 0"), output[-3000:]
    assert "Skipped 2 unreadable file(s) of the train set" in output
    assert all(str(path) in output for path in bad)
    assert str(odd["wide"][0]) in output  # the thin-image warning
    assert "image_AUROC" in output


def test_predict_on_a_folder_names_or_skips_corrupt_images(root: Path, tmp_path: Path) -> None:
    """`engine.predict(data_path=...)` (as `anomalib predict --data <folder>`) checks its images before predicting."""
    folder = tmp_path / "line"
    shutil.copytree(root / "brick" / "test" / "good", folder)
    bad = _truncate(folder / "001.png")
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        make_engine(tmp_path / "results").predict(small_model(**MODEL_KWARGS), data_path=folder)
    predictions = make_engine(tmp_path / "results", callbacks=[DataChecks(skip_corrupt_images=True)]).predict(
        small_model(**MODEL_KWARGS), data_path=folder
    )
    names = sorted(Path(item.image_path).name for batch in predictions for item in batch)
    assert names == ["000.png", "002.png"]


@pytest.mark.parametrize(
    ("pixels", "suffix", "shown"),
    [
        (np.full((16, 16), 0.5, np.float32), ".tiff", "mode F, values 0.5..0.5"),  # float in [0, 1]: reads black
        (np.full((16, 16), np.nan, np.float32), ".tiff", "mode F, values 0..0"),  # NaN: reads 0
        (np.arange(-128, 128, dtype=np.int32).reshape(16, 16), ".tiff", "mode I, values -128..127"),  # clipped
        (np.full((16, 16), 4095, np.uint16), ".png", "mode I;16, values 4095..4095"),  # 12-bit: reads white
    ],
    ids=["float", "nan", "int32", "12-bit"],
)
def test_float_and_wide_integer_images_anomalib_would_misread_are_refused(
    pixels: np.ndarray, suffix: str, shown: str, tmp_path: Path
) -> None:
    """anomalib's reader converts F, I and I;16 images to 8 bits: values it would change are refused by name."""
    from anomalib.data import PredictDataset

    Image.new("RGB", (16, 16), (120, 80, 40)).save(tmp_path / "000.png")
    path = tmp_path / f"001{suffix}"
    Image.fromarray(pixels).save(path)
    with pytest.raises(ClippedImageError) as error:
        DataChecks().check_dataset(PredictDataset(tmp_path), "predict")
    assert f"{path} ({shown})" in str(error.value) and "000.png" not in str(error.value)


def test_wide_grayscale_images_that_read_unchanged_pass(tmp_path: Path) -> None:
    """An F or I image of whole numbers in 0..255 reads the same through anomalib's 8-bit conversion."""
    from anomalib.data import PredictDataset

    Image.fromarray(np.arange(256, dtype=np.float32).reshape(16, 16)).save(tmp_path / "000.tiff")
    Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16)).save(tmp_path / "001.tiff")
    DataChecks().check_dataset(PredictDataset(tmp_path), "predict")
