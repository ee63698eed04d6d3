"""`anomalib fit` trains the paper's 50 epochs unless told otherwise; the model's epoch count beats the trainer's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ...helpers import checkpoints, data_args, run_cli

pytestmark = pytest.mark.slow

# Two blocks of ViT-S at 56 px, no validation: 50 epochs take seconds.
FAST = [
    "--model.pretrained", "false",
    "--model.teacher", "vit_small_patch14_dinov2",
    "--model.image_size", "56",
    "--model.layers", "[0,1]",
    "--trainer.limit_val_batches", "0",
]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "epochs"),
    [
        ([], 50),
        (["--trainer.max_epochs", "3"], 3),
        (["--trainer.max_epochs", "3", "--model.max_epochs", "2"], 2),
    ],
    ids=["default-paper-50", "trainer-option", "model-option-wins"],
)
def test_epoch_count(options: list[str], epochs: int, demo_root: Path, tmp_path: Path) -> None:
    result = run_cli(
        ["fit", "--model", "TransformerStudent", *FAST, *options, *data_args(demo_root),
         "--default_root_dir", str(tmp_path / "results")],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = checkpoints(tmp_path / "results")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == epochs * 2  # the 8 training images of demo_root in batches of 4
    output = result.stdout + result.stderr
    assert ("training the paper's 50 epochs" in output) == (not options)
    assert "Training batch size is 4" not in output  # the paper's batch size: no note
