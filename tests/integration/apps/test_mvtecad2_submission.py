"""A whole MVTec AD 2 submission from checkpoints: all 8 categories, both private test sets, MVTec's rules, packed.

The session's small model (random ViT-S/14, 112 px) is validated again with a QuantilePostProcessor on a generated
``validation/good`` folder, as the how-to describes, and serves every category. Images are 28 x 42 px, MVTec's
names, MVTec's counts scaled down (``tests/mvtecad2_trees.py``), which the checks take instead of the real ones.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from anomalib.data import MVTecAD2
from anomalib.data.utils import read_image
from PIL import Image

from anomalib_transformer_student.apps import cli, mvtecad2_submission, mvtecad2_writer
from anomalib_transformer_student.apps.mvtecad2_predictions import load_for_masks
from anomalib_transformer_student.apps.mvtecad2_submission import CATEGORIES, check_submission
from anomalib_transformer_student.model.post_processing import QuantilePostProcessor

from ...factories import Trained, make_engine
from ...mvtecad2_trees import TINY_COUNTS, write_private_test_sets

PIXEL_QUANTILE = 0.99
HEIGHT, WIDTH = 28, 42


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Private test sets of all 8 categories; can also has train, validation and test_public for validation."""
    root = write_private_test_sets(tmp_path_factory.mktemp("mvtec_ad_2"), TINY_COUNTS, (HEIGHT, WIDTH))
    rng = np.random.default_rng(1)
    for folder, count in {"train/good": 2, "validation/good": 4, "test_public/good": 1}.items():
        (root / "can" / folder).mkdir(parents=True)
        for index in range(count):
            pixels = (128 + 20 * rng.standard_normal((HEIGHT, WIDTH, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "can" / folder / f"{index:03d}_regular.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(trained_small: Trained, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's model, validated with QuantilePostProcessor on can's validation/good, saved."""
    workdir = tmp_path_factory.mktemp("quantile_checkpoint")
    post_processor = QuantilePostProcessor(image_quantile=0.5, pixel_quantile=PIXEL_QUANTILE)
    model = type(trained_small.model).load_from_checkpoint(
        trained_small.checkpoint, post_processor=post_processor, feature_cache=False, visualizer=False
    )
    engine = make_engine(workdir / "results")
    datamodule = MVTecAD2(root=data_root, category="can", num_workers=0, eval_batch_size=2, test_type="private")
    engine.validate(model, datamodule=datamodule)
    path = workdir / "can.ckpt"
    engine.trainer.save_checkpoint(path)
    return path


@pytest.fixture
def scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    """MVTec's counts scaled down, for the command line too."""
    monkeypatch.setattr(mvtecad2_submission, "IMAGE_COUNTS", TINY_COUNTS)


def _raw_map(model: torch.nn.Module, path: Path) -> np.ndarray:
    with torch.no_grad():
        return model(read_image(path, as_tensor=True)[None]).anomaly_map.squeeze().numpy()


def test_threshold_is_the_quantile_of_good_validation_pixels(checkpoint: Path, data_root: Path) -> None:
    """The masks' threshold: the pixel quantile of the raw maps of validation/good, nothing else."""
    model, threshold = load_for_masks(checkpoint)
    maps = np.stack([_raw_map(model, path) for path in sorted((data_root / "can" / "validation" / "good").iterdir())])
    expected = np.quantile(maps, PIXEL_QUANTILE, method="inverted_cdf")
    assert expected * (1 - 1e-5) <= threshold <= expected * (1 + 2**-11 + 1e-5)
    assert (maps > threshold).mean() <= 1 - PIXEL_QUANTILE and threshold < maps.max()


def test_a_checkpoint_without_a_good_image_threshold_is_refused(
    trained_small: Trained, data_root: Path, tmp_path: Path, scaled: None, capsys: pytest.CaptureFixture
) -> None:
    """anomalib's F1-adaptive threshold (here fitted on defective validation images) is not MVTec AD 2's protocol."""
    status = cli.main(["predict-mvtecad2", "--ckpt", str(trained_small.checkpoint), "--category", "sheet_metal",
                       "--data-root", str(data_root), "--output", str(tmp_path / "out")])  # fmt: skip
    assert status == 2
    assert "no pixel threshold from good validation images" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # nothing written


def test_all_eight_categories_make_one_submission_that_passes_mvtecs_rules_and_is_packed(
    checkpoint: Path, data_root: Path, tmp_path: Path, scaled: None, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "submission"
    arguments = [argument for category in CATEGORIES for argument in ("--ckpt", f"{category}={checkpoint}")]
    status = cli.main(["predict-mvtecad2", "--data-root", str(data_root), "--output", str(output), *arguments])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "passes every rule" in printed and f"Packed: {tmp_path / 'submission.tar.gz'}" in printed
    assert check_submission(output, TINY_COUNTS) == []
    assert sorted(path.name for path in output.iterdir()) == ["anomaly_images", "anomaly_images_thresholded"]
    with tarfile.open(tmp_path / "submission.tar.gz") as tar:
        assert len(tar.getnames()) == 2 * 2 * sum(TINY_COUNTS.values())

    model, threshold = load_for_masks(checkpoint)
    image = data_root / "fabric" / "test_private_mixed" / "001_mixed.png"
    raw = _raw_map(model, image)
    stored = tifffile.imread(output / "anomaly_images" / "fabric" / "test_private_mixed" / "001_mixed.tiff")
    mask = np.asarray(Image.open(output / "anomaly_images_thresholded/fabric/test_private_mixed/001_mixed.png"))
    assert stored.dtype == np.float16 and stored.shape == mask.shape == raw.shape == (HEIGHT, WIDTH)
    assert np.allclose(stored, raw, rtol=2**-11, atol=2**-24) and raw.min() >= 0 and raw.max() <= 4
    far = np.abs(raw - threshold) > 1e-4 * threshold
    assert np.array_equal((mask == 255)[far], (raw > threshold)[far])


class Killed(Exception):
    """Stands for a killed process."""


def test_category_after_category_resumes_after_a_kill(
    checkpoint: Path, data_root: Path, tmp_path: Path, scaled: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    output = tmp_path / "submission"
    first = ["--ckpt", f"can={checkpoint}", "--ckpt", f"fabric={checkpoint}"]
    base = ["predict-mvtecad2", "--data-root", str(data_root), "--output", str(output)]
    writes = 0
    write_mask = mvtecad2_writer.SubmissionWriter.write_mask

    def killed_on_the_sixth_mask(self, *args, **kwargs) -> Path:  # can's 4 images, then fabric's second
        nonlocal writes
        writes += 1
        if writes == 6:
            (output / "anomaly_images_thresholded/fabric/test_private/.001_regular.png.dead.tmp").write_bytes(b"")
            raise Killed
        return write_mask(self, *args, **kwargs)

    monkeypatch.setattr(mvtecad2_writer.SubmissionWriter, "write_mask", killed_on_the_sixth_mask)
    with pytest.raises(Killed):
        cli.main([*base, *first])
    monkeypatch.setattr(mvtecad2_writer.SubmissionWriter, "write_mask", write_mask)
    can = output / "anomaly_images" / "can" / "test_private" / "000_regular.tiff"
    written = can.stat().st_mtime_ns

    assert cli.main([*base, *first]) == 0  # the same command again
    printed = capsys.readouterr().out
    assert "Removed 1 temporary file(s)" in printed and "Kept" in printed and "can/test_private_mixed" in printed
    (to_do,) = [line for line in printed.splitlines() if line.startswith("Not packed yet")]
    assert "fruit_jelly/test_private," in to_do and "can/" not in to_do and "fabric/" not in to_do
    assert can.stat().st_mtime_ns == written  # finished test sets are kept, not written again
    assert not list(output.rglob("*.tmp"))

    rest = [argument for category in CATEGORIES[2:] for argument in ("--ckpt", f"{category}={checkpoint}")]
    assert cli.main([*base, *rest]) == 0  # the other six categories into the same folder
    assert "passes every rule" in capsys.readouterr().out
    assert check_submission(output, TINY_COUNTS) == [] and (tmp_path / "submission.tar.gz").is_file()
