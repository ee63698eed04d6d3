"""predict-mvtecad2 without a trained model: every input checked before a model loads, and safe writing.

Bad inputs (missing folders, unknown categories, MVTec's names and counts, shared stems, images anomalib would
read wrongly, unloadable checkpoints) end with one line and exit status 2; the output folder is claimed by its
layout alone; writes go through directory descriptors and never follow a link.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from anomalib_transformer_student.apps import cli
from anomalib_transformer_student.apps.mvtecad2_predictions import check_mvtecad2_folders
from anomalib_transformer_student.apps.mvtecad2_writer import SubmissionWriter

from ...mvtecad2_trees import write_private_test_sets

STEM = "000_regular"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sheet_metal's private test sets with MVTec's real count (142) and names, tiny images."""
    return write_private_test_sets(tmp_path_factory.mktemp("data"), {"sheet_metal": 142}, size=(4, 6))


def _predict(tmp_path: Path, root: Path, checkpoint: Path | None = None, *extra: str) -> int:
    if checkpoint is None:
        checkpoint = tmp_path / "model.ckpt"
        checkpoint.write_bytes(b"not a checkpoint")
    return cli.main(["predict-mvtecad2", "--ckpt", f"sheet_metal={checkpoint}", "--data-root", str(root),
                     "--output", str(tmp_path / "out"), *extra])  # fmt: skip


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
    assert _predict(tmp_path, tmp_path / "missing") == 2
    assert f"'{tmp_path / 'missing' / 'sheet_metal'}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_category_is_refused_naming_the_eight(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"x")
    status = cli.main(["predict-mvtecad2", "--ckpt", str(checkpoint), "--category", "brick", "--data-root",
                       str(tmp_path)])  # fmt: skip
    assert status == 2
    assert "'brick' is not an MVTec AD 2 category" in capsys.readouterr().err


def test_names_and_counts_other_than_mvtecs_are_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = write_private_test_sets(tmp_path / "data", {"sheet_metal": 3}, size=(4, 6))
    assert _predict(tmp_path, root) == 2
    error = capsys.readouterr().err
    assert "wants 142 for sheet_metal/test_private" in error and "missing 139" in error
    assert not (tmp_path / "out").exists()


def test_images_sharing_a_stem_are_refused_naming_both(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = Path(shutil.copytree(dataset, tmp_path / "data"))
    Image.new("RGB", (6, 4)).save(root / "sheet_metal" / "test_private" / "000_regular.jpg")
    assert _predict(tmp_path, root) == 2
    error = capsys.readouterr().err
    assert "000_regular.jpg and 000_regular.png" in error and "nothing was written" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("mode", "pixels", "shown"),
    [
        ("I;16", np.full((4, 6), 4095, np.uint16), "mode I;16, values 4095..4095"),  # 12-bit: reads white
        ("F", np.full((4, 6), 0.5, np.float32), "mode F, values 0.5..0.5"),  # float in [0, 1]: reads black
        ("I", np.full((4, 6), -100, np.int32), "mode I, values -100..-100"),  # negative: clipped
    ],
)
def test_wide_grayscale_images_anomalib_would_misread_are_refused_naming_the_file(
    mode: str, pixels: np.ndarray, shown: str, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = Path(shutil.copytree(dataset, tmp_path / "data"))
    image = root / "sheet_metal" / "test_private_mixed" / "007_mixed.png"
    image.unlink()
    image = image.with_suffix(".png" if mode == "I;16" else ".tiff")  # a 16-bit PNG, float and int32 TIFFs
    Image.fromarray(pixels).save(image)
    assert Image.open(image).mode == mode
    assert _predict(tmp_path, root) == 2
    error = capsys.readouterr().err
    assert f"{image} ({shown})" in error
    assert not (tmp_path / "out").exists()


def _truncated(path: Path) -> Path:
    torch.save({"state_dict": {"weight": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def _pickle_payload(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": _Payload(path.parent / "payload_ran")}))
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(os.urandom(512))
    return path


@pytest.mark.parametrize("make", [_garbage, _truncated, _pickle_payload], ids=["garbage", "truncated", "payload"])
@pytest.mark.parametrize("command", ["predict-mvtecad2", "evaluate"])
def test_an_unloadable_checkpoint_is_one_line_and_exit_2(
    make, command: str, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = make(tmp_path / "model.ckpt")
    if command == "evaluate":
        (dataset / "sheet_metal" / "test_public").mkdir(exist_ok=True)
        status = cli.main(["evaluate", "--dataset", "mvtecad2", "--data-root", str(dataset), "--ckpt",
                           f"sheet_metal={checkpoint}", "--output", str(tmp_path / "report")])  # fmt: skip
    else:
        status = _predict(tmp_path, dataset, checkpoint)
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith(f"transformer-student {command}: error: Cannot load checkpoint '{checkpoint}'")
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert "weights_only" not in error
    assert not (tmp_path / "payload_ran").exists()
    if command == "predict-mvtecad2":
        assert list((tmp_path / "out").iterdir()) == []  # nothing written


def test_writes_float16_tiff_and_binary_png_in_the_layout(tmp_path: Path) -> None:
    anomaly_map = np.linspace(0, 4, 12, dtype=np.float32).reshape(3, 4)
    with SubmissionWriter(tmp_path / "out") as writer:
        map_path = writer.write_map("sheet_metal", "test_private", STEM, anomaly_map)
        mask_path = writer.write_mask("sheet_metal", "test_private", STEM, anomaly_map > 1)
    assert map_path == tmp_path / "out/anomaly_images/sheet_metal/test_private/000_regular.tiff"
    assert mask_path == tmp_path / "out/anomaly_images_thresholded/sheet_metal/test_private/000_regular.png"
    stored = tifffile.imread(map_path)
    assert stored.dtype == np.float16 and np.allclose(stored, anomaly_map, rtol=2**-11)
    mask = np.asarray(Image.open(mask_path))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 255, anomaly_map > 1)
    assert sorted(p.name for p in map_path.parent.iterdir()) == ["000_regular.tiff"]  # no temporary left
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["anomaly_images", "anomaly_images_thresholded"]


@pytest.mark.parametrize("value", [1e6, np.nan, np.inf])
def test_a_value_float16_cannot_hold_writes_nothing(value: float, tmp_path: Path) -> None:
    with SubmissionWriter(tmp_path / "out") as writer, pytest.raises(ValueError, match="float16, the precision"):
        writer.write_map("sheet_metal", "test_private", STEM, np.full((2, 2), value, dtype=np.float32))
    assert [path for path in (tmp_path / "out").rglob("*") if path.is_file()] == []


def test_refuses_a_folder_with_anything_but_the_layout_and_touches_nothing(tmp_path: Path) -> None:
    for intruder in ["notes.txt", ".transformer_student_predictions", "anomaly_images/can/test_private/a.txt",
                     "anomaly_images/brick/000_regular.png"]:  # fmt: skip
        folder = tmp_path / f"foreign{len(intruder)}"
        (folder / intruder).parent.mkdir(parents=True, exist_ok=True)
        (folder / intruder).write_text("mine")
        (folder / "anomaly_images_thresholded/can/test_private").mkdir(parents=True)
        (folder / "anomaly_images_thresholded/can/test_private/.000_regular.png.ab12.tmp").write_text("left")
        with pytest.raises(FileExistsError, match="not part of an MVTec AD 2 submission") as error:
            SubmissionWriter(folder)
        assert intruder.removesuffix("/000_regular.png") in str(error.value)
        assert (folder / intruder).read_text() == "mine"
        assert (folder / "anomaly_images_thresholded/can/test_private/.000_regular.png.ab12.tmp").exists()


def test_reuses_its_own_folder_removing_temporary_leftovers(tmp_path: Path) -> None:
    with SubmissionWriter(tmp_path / "ours") as writer:
        writer.write_mask("sheet_metal", "test_private", STEM, np.zeros((2, 2), bool))
    leftover = tmp_path / "ours/anomaly_images/sheet_metal/test_private/.000_regular.tiff.ab12.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    with SubmissionWriter(tmp_path / "ours") as writer:
        assert writer.removed == [leftover]
        assert not writer.finished("sheet_metal", "test_private", [STEM])  # the map is missing
        writer.write_mask("sheet_metal", "test_private", STEM, np.ones((2, 2), bool))  # a second run overwrites
        writer.write_map("sheet_metal", "test_private", STEM, np.ones((2, 2)))
        assert writer.finished("sheet_metal", "test_private", [STEM])
    assert not leftover.exists()
    path = tmp_path / "ours" / "anomaly_images_thresholded/sheet_metal/test_private/000_regular.png"
    assert np.asarray(Image.open(path)).min() == 255


def test_never_follows_symbolic_links(tmp_path: Path) -> None:
    """A linked folder is refused; a linked file is replaced by the new file, its target untouched."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output = tmp_path / "out"
    (output / "anomaly_images").mkdir(parents=True)
    (output / "anomaly_images" / "can").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(FileExistsError, match="not part of an MVTec AD 2 submission"):
        SubmissionWriter(output)
    (output / "anomaly_images" / "can").unlink()
    target = elsewhere / "victim.png"
    target.write_bytes(b"keep")
    folder = output / "anomaly_images_thresholded" / "sheet_metal" / "test_private"
    folder.mkdir(parents=True)
    with SubmissionWriter(output) as writer:
        (folder / "000_regular.png").symlink_to(target)  # planted after the folder was claimed
        path = writer.write_mask("sheet_metal", "test_private", STEM, np.zeros((2, 2), bool))
    assert target.read_bytes() == b"keep" and not path.is_symlink()
    link = tmp_path / "link"
    os.symlink(output, link)
    with pytest.raises(FileExistsError, match="symbolic link"):
        SubmissionWriter(link)


def test_a_folder_swapped_for_a_link_after_the_check_is_not_followed(tmp_path: Path) -> None:
    """The writer holds the folder's descriptor: a link put in its place later leads nowhere."""
    victim = tmp_path / "victim"
    victim.mkdir()
    output = tmp_path / "out"
    with SubmissionWriter(output) as writer:
        writer.write_mask("can", "test_private", STEM, np.zeros((2, 2), bool))
        checked = output / "anomaly_images_thresholded" / "can" / "test_private"
        checked.rename(tmp_path / "moved")
        checked.symlink_to(victim, target_is_directory=True)
        writer.write_mask("can", "test_private", "001_regular", np.zeros((2, 2), bool))
    assert list(victim.iterdir()) == []
    assert sorted(path.name for path in (tmp_path / "moved").iterdir()) == ["000_regular.png", "001_regular.png"]
