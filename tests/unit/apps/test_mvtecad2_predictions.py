"""predict-mvtecad2 without a model: folder checks before anything loads, and safe writing of maps and masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from anomalib_transformer_student.apps import cli
from anomalib_transformer_student.apps.mvtecad2_predictions import (
    MARKER,
    PredictionWriter,
    check_mvtecad2_folders,
)

RELATIVE = Path("sheet_metal/test_private/000_regular.png")


def test_missing_category_names_the_path_and_what_the_root_holds(tmp_path: Path) -> None:
    (tmp_path / "can").mkdir()
    with pytest.raises(FileNotFoundError, match=r"sheet_metal' \('.*' holds: can\)"):
        check_mvtecad2_folders(tmp_path, "sheet_metal", ["test_private"])


def test_missing_test_set_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "sheet_metal" / "test_private").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"test_private_mixed'.*holds: test_private"):
        check_mvtecad2_folders(tmp_path, "sheet_metal", ["test_private", "test_private_mixed"])


def test_command_stops_on_a_missing_folder_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The checkpoint is not even a checkpoint: the folder check comes first, with exit status 2."""
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not a checkpoint")
    status = cli.main(["predict-mvtecad2", "--ckpt", str(checkpoint), "--data-root", str(tmp_path / "missing"),
                       "--category", "sheet_metal", "--output", str(tmp_path / "out")])  # fmt: skip
    assert status == 2
    assert f"'{tmp_path / 'missing' / 'sheet_metal'}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_writes_float_tiff_and_binary_png_in_the_layout(tmp_path: Path) -> None:
    writer = PredictionWriter(tmp_path / "out", map_dtype="float16")
    anomaly_map = np.linspace(0, 2, 12, dtype=np.float32).reshape(3, 4)
    map_path = writer.write_map(RELATIVE, anomaly_map)
    mask_path = writer.write_mask(RELATIVE, anomaly_map > 1)
    assert map_path == tmp_path / "out/anomaly_images/sheet_metal/test_private/000_regular.tiff"
    assert mask_path == tmp_path / "out/anomaly_images_thresholded/sheet_metal/test_private/000_regular.png"
    stored = tifffile.imread(map_path)
    assert stored.dtype == np.float16 and np.allclose(stored, anomaly_map, rtol=1e-3)
    mask = np.asarray(Image.open(mask_path))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 255, anomaly_map > 1)
    assert sorted(p.name for p in map_path.parent.iterdir()) == ["000_regular.tiff"]  # no temporary left


def test_float16_overflow_is_refused_with_the_fix(tmp_path: Path) -> None:
    writer = PredictionWriter(tmp_path / "out")
    with pytest.raises(ValueError, match="--map-dtype float32"):
        writer.write_map(RELATIVE, np.full((2, 2), 1e6, dtype=np.float32))
    assert tifffile.imread(PredictionWriter(tmp_path / "out", "float32").write_map(RELATIVE, np.full((2, 2), 1e6)))[
        0, 0
    ] == pytest.approx(1e6)


def test_refuses_a_folder_it_did_not_write_and_reuses_its_own(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by predict-mvtecad2"):
        PredictionWriter(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    PredictionWriter(tmp_path / "ours").write_mask(RELATIVE, np.zeros((2, 2), bool))
    assert (tmp_path / "ours" / MARKER).is_file()
    PredictionWriter(tmp_path / "ours").write_mask(RELATIVE, np.ones((2, 2), bool))  # a second run overwrites
    path = tmp_path / "ours" / "anomaly_images_thresholded" / RELATIVE
    assert np.asarray(Image.open(path)).min() == 255


def test_never_follows_symbolic_links(tmp_path: Path) -> None:
    """A linked folder is refused; a linked file is replaced by the new file, its target untouched."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output = tmp_path / "out"
    writer = PredictionWriter(output)
    (output / "anomaly_images").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(FileExistsError, match="symbolic link"):
        writer.write_map(RELATIVE, np.zeros((2, 2), np.float32))
    assert list(elsewhere.iterdir()) == []
    target = elsewhere / "victim.png"
    target.write_bytes(b"keep")
    folder = output / "anomaly_images_thresholded" / RELATIVE.parent
    folder.mkdir(parents=True)
    (folder / "000_regular.png").symlink_to(target)
    path = writer.write_mask(RELATIVE, np.zeros((2, 2), bool))
    assert target.read_bytes() == b"keep" and not path.is_symlink()
    link = tmp_path / "link"
    os.symlink(output, link)
    with pytest.raises(FileExistsError, match="symbolic link"):
        PredictionWriter(link)
