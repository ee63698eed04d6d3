"""`transformer-student evaluate`: the size-AUPRO report from trained checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from PIL import Image

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps.cli import main
from anomalib_transformer_student.metrics import FPR_LIMITS, SUBSETS

from ..helpers import SMALL_TEACHER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("evaluate")
    datamodule = MVTecAD(root=demo_root, category="brick", num_workers=0, train_batch_size=4, eval_batch_size=4)
    model = TransformerStudent(teacher=SMALL_TEACHER, pretrained=False, image_size=112)
    engine = Engine(max_epochs=1, default_root_dir=workdir, logger=False)
    engine.fit(model, datamodule=datamodule)
    path = workdir / "brick.ckpt"
    engine.trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("options", [[], ["--curve", "authors"]], ids=["exact", "authors"])
def test_evaluate_prints_and_writes_the_report(
    options: list[str], checkpoint: Path, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "report"
    arguments = ["--data-root", str(demo_root), "--ckpt", f"brick={checkpoint}", "--output", str(output), *options]
    code = main(["evaluate", *arguments])
    assert code == 0
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


def test_evaluate_rejects_malformed_checkpoint_entries(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CATEGORY=PATH"):
        main(["evaluate", "--data-root", str(demo_root), "--ckpt", "no-separator"])
    with pytest.raises(FileNotFoundError, match="brick"):
        main(["evaluate", "--data-root", str(demo_root), "--ckpt", f"brick={tmp_path / 'missing.ckpt'}"])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["evaluate", "--data-root", str(demo_root), "--ckpt", "brick=model.ckpt", "--curve", "sampled"])
