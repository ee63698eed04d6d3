"""`transformer-student evaluate`: the size-AUPRO report from trained checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from anomalib.data.datamodules.image import mvtecad
from PIL import Image

from anomalib_transformer_student.apps.cli import main
from anomalib_transformer_student.metrics import FPR_LIMITS, SUBSETS

from ...factories import Trained

pytestmark = pytest.mark.slow


@pytest.fixture
def checkpoint(trained_small: Trained) -> Path:
    """The session's small model's checkpoint, alone in its folder (``trained_small`` in conftest.py)."""
    return trained_small.checkpoint


@pytest.mark.parametrize("options", [[], ["--curve", "authors"]], ids=["exact", "authors"])
def test_evaluate_prints_and_writes_the_report(
    options: list[str], checkpoint: Path, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "report"
    arguments = ["--data-root", str(demo_root), "--ckpt", f"brick={checkpoint}", "--output", str(output), *options]
    beside_checkpoint, in_data = _files(checkpoint.parent), _files(demo_root)
    code = main(["evaluate", *arguments])
    assert code == 0
    # Everything is written under --output: nothing beside the checkpoint (a read-only place), nothing in the data.
    assert _files(checkpoint.parent) == beside_checkpoint
    assert _files(demo_root) == in_data
    assert list(output.rglob("images/**/*.png"))  # anomalib's per-image visualisations, under --output
    printed = capsys.readouterr().out
    assert "## brick" in printed and "| Q1 |" in printed and "image_AUROC" in printed
    with (output / "size_aupro.csv").open() as file:
        rows = list(csv.DictReader(file))
    aupro = [row for row in rows if row["metric"] == "AUPRO"]
    assert len(aupro) == len(SUBSETS) * len(FPR_LIMITS)
    assert all(0.0 <= float(row["value"]) <= 1.0 for row in aupro)
    assert {row["metric"] for row in rows} >= {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"}
    assert "| Q4 |" in (output / "size_aupro.md").read_text()
    with Image.open(output / "size_aupro.png") as plot:
        assert plot.size[0] > 200 and plot.size[1] > 200


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def test_evaluate_rejects_malformed_checkpoint_entries(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--data-root", str(demo_root), "--ckpt", "no-separator"]) == 2
    assert "evaluate: error: --ckpt expects CATEGORY=PATH" in capsys.readouterr().err
    assert main(["evaluate", "--data-root", str(demo_root), "--ckpt", f"brick={tmp_path / 'missing.ckpt'}"]) == 2
    assert "evaluate: error: Checkpoint not found for category 'brick'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["evaluate", "--data-root", str(demo_root), "--ckpt", "brick=model.ckpt", "--curve", "sampled"])


@pytest.mark.parametrize("typo", ["category", "data-root"])
def test_a_missing_category_folder_is_named_before_anything_is_loaded_or_downloaded(
    typo: str, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo must never make anomalib download MVTec AD (4.9 GB): the folder is checked before any loading."""

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluate must never download a dataset")

    monkeypatch.setattr(mvtecad, "download_and_extract", no_download)
    # Not a checkpoint: the category is checked before the checkpoint is read.
    checkpoint = tmp_path / "brick.ckpt"
    checkpoint.write_bytes(b"not a checkpoint")
    data_root, category = (demo_root, "brik") if typo == "category" else (tmp_path / "MVTecAD", "brick")
    arguments = ["--data-root", str(data_root), "--ckpt", f"{category}={checkpoint}", "--output", str(tmp_path / "r")]

    assert main(["evaluate", *arguments]) == 2

    error = capsys.readouterr().err
    assert f"evaluate: error: No folder for category '{category}' under --data-root '{data_root}'" in error
    assert str(data_root / category) in error
    assert ("it holds: brick" if typo == "category" else "it holds no category folder") in error
    assert "never downloads" in error
    assert not (tmp_path / "r").exists()
