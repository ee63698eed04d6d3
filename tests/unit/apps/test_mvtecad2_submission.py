"""MVTec's submission rules, as its public checker applies them, on generated trees of all 8 categories.

Each rule is broken once on an otherwise valid folder and must be reported under its name; the valid folder passes
and packs as MVTec's script does. Counts are MVTec's scaled down and passed to the check.
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from anomalib_transformer_student.apps import cli, mvtecad2_submission
from anomalib_transformer_student.apps.mvtecad2_submission import (
    IMAGE_COUNTS,
    SubmissionError,
    check_submission,
    pack_submission,
)

from ...mvtecad2_trees import SCALED_COUNTS, write_submission

MAPS = "anomaly_images/sheet_metal/test_private"
MASKS = "anomaly_images_thresholded/sheet_metal/test_private"


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_submission(tmp_path_factory.mktemp("valid") / "submission")


@pytest.fixture
def folder(valid: Path, tmp_path: Path) -> Path:
    """A private copy of the valid folder, free to break."""
    return Path(shutil.copytree(valid, tmp_path / "submission"))


def test_mvtecs_counts_are_the_default() -> None:
    assert IMAGE_COUNTS == {"can": 321, "fabric": 314, "fruit_jelly": 255, "rice": 277, "sheet_metal": 142,
                            "vial": 276, "wallplugs": 232, "walnuts": 228}  # fmt: skip


def test_a_valid_folder_of_all_8_categories_passes_and_packs_as_mvtec_does(valid: Path, tmp_path: Path) -> None:
    assert check_submission(valid, SCALED_COUNTS) == []
    archive = pack_submission(valid, tmp_path / "upload.tar.gz", progress=False)
    with tarfile.open(archive, "r:gz") as tar:
        names = sorted(tar.getnames())
        assert all(member.isfile() for member in tar.getmembers())
    expected = sorted(f"submission/{path.relative_to(valid).as_posix()}" for path in valid.rglob("*") if path.is_file())
    assert names == expected and len(names) == 2 * 2 * sum(SCALED_COUNTS.values())
    assert "submission/anomaly_images/can/test_private_mixed/000_mixed.tiff" in names


def test_real_counts_are_checked_by_default(valid: Path) -> None:
    problems = check_submission(valid)
    assert {problem.rule for problem in problems} == {"file-count", "names"}
    assert any("expected 142 entries, found 1" in problem.message for problem in problems)


def _hidden_marker(folder: Path) -> None:
    (folder / ".transformer_student_predictions").write_text("x")


def _third_top_folder(folder: Path) -> None:
    (folder / "notes").mkdir()


def _missing_category(folder: Path) -> None:
    shutil.rmtree(folder / "anomaly_images" / "walnuts")


def _file_among_categories(folder: Path) -> None:
    (folder / "anomaly_images" / "README.txt").write_text("x")


def _extra_test_set(folder: Path) -> None:
    (folder / "anomaly_images_thresholded" / "can" / "test_public").mkdir()


def _killed_run_leftover(folder: Path) -> None:
    (folder / MAPS / ".000_regular.tiff.1a2b.tmp").write_bytes(b"")


def _tif_suffix(folder: Path) -> None:
    (folder / MAPS / "000_regular.tiff").rename(folder / MAPS / "000_regular.tif")


def _regular_in_mixed(folder: Path) -> None:
    mixed = folder / "anomaly_images" / "can" / "test_private_mixed"
    (mixed / "000_mixed.tiff").rename(mixed / "000_regular.tiff")


def _float32_map(folder: Path) -> None:
    tifffile.imwrite(folder / MAPS / "000_regular.tiff", np.zeros((3, 4), np.float32))


def _three_channel_map(folder: Path) -> None:
    tifffile.imwrite(folder / MAPS / "000_regular.tiff", np.zeros((3, 4, 3), np.float16))


def _mask_of_ones(folder: Path) -> None:
    Image.fromarray(np.ones((3, 4), np.uint8)).save(folder / MASKS / "000_regular.png")


def _rgb_mask(folder: Path) -> None:
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(folder / MASKS / "000_regular.png")


@pytest.mark.parametrize(
    ("breaker", "rule", "where"),
    [
        (_hidden_marker, "root", ".transformer_student_predictions"),
        (_third_top_folder, "root", "notes"),
        (_missing_category, "categories", "walnuts"),
        (_file_among_categories, "categories", "README.txt"),
        (_extra_test_set, "test-sets", "test_public"),
        (_killed_run_leftover, "file-count", "expected 1 entries, found 2"),
        (_tif_suffix, "names", "000_regular.tif "),
        (_regular_in_mixed, "names", "000_regular.tiff"),
        (_float32_map, "maps", "float32, not float16"),
        (_three_channel_map, "maps", "not single-channel"),
        (_mask_of_ones, "masks", "values other than 0 and 255: [1]"),
        (_rgb_mask, "masks", "not single-channel"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_each_rule_is_reported_by_name(breaker: Callable[[Path], None], rule: str, where: str, folder: Path) -> None:
    breaker(folder)
    problems = check_submission(folder, SCALED_COUNTS)
    assert problems, "the broken folder passed"
    assert rule in {problem.rule for problem in problems}
    assert any(where in f"{problem.message} " for problem in problems if problem.rule == rule), problems


def test_the_archive_never_goes_inside_the_folder_nor_packs_links(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SubmissionError, match="inside the submission"):
        pack_submission(folder, folder / "anomaly_images" / "x.tar.gz", progress=False)
    (folder / MAPS / "000_regular.tiff").unlink()
    (folder / MAPS / "000_regular.tiff").symlink_to(tmp_path)
    with pytest.raises(SubmissionError, match="symbolic link"):
        pack_submission(folder, progress=False)


def test_check_command_names_each_broken_rule_and_exits_2(folder: Path, capsys: pytest.CaptureFixture) -> None:
    _hidden_marker(folder)
    _float32_map(folder)
    status = cli.main(["predict-mvtecad2", "--check", str(folder)])
    error = capsys.readouterr().err
    assert status == 2
    assert "problem(s) with MVTec's submission rules (root, file-count, names, maps)" in error  # real counts too
    assert not (folder.parent / "submission.tar.gz").exists()


def test_check_command_packs_a_passing_folder(
    folder: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mvtecad2_submission, "IMAGE_COUNTS", SCALED_COUNTS)
    assert cli.main(["predict-mvtecad2", "--check", str(folder)]) == 0
    assert "passes every rule" in capsys.readouterr().out
    assert tarfile.is_tarfile(folder.parent / "submission.tar.gz")
    assert sorted(path.name for path in folder.iterdir()) == ["anomaly_images", "anomaly_images_thresholded"]


def test_packing_never_replaces_a_file_already_at_the_archives_path(tmp_path: Path) -> None:
    folder = tmp_path / "submission"
    (folder / "anomaly_images").mkdir(parents=True)
    (folder / "anomaly_images" / "a.txt").write_text("x")
    existing = tmp_path / "submission.tar.gz"
    existing.write_text("someone's file")
    with pytest.raises(SubmissionError, match="already exists"):
        pack_submission(folder, progress=False)
    assert existing.read_text() == "someone's file"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["submission", "submission.tar.gz"]
