"""`anomalib fit` trains the paper's 50 epochs unless told otherwise; the model's epoch count beats the trainer's.

anomalib's CLI runs in this process: what it parses and runs is the console script's, without its imports.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ...helpers import anomalib_cli, checkpoints, data_args

pytestmark = pytest.mark.slow
SCHEDULE_LOGGER = "anomalib_transformer_student.training.schedule"

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
def test_epoch_count(
    options: list[str],
    epochs: int,
    demo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger=SCHEDULE_LOGGER)  # the level anomalib's console script logs at
    anomalib_cli(
        ["fit", "--model", "TransformerStudent", *FAST, *options, *data_args(demo_root),
         "--default_root_dir", str(tmp_path / "results")]
    )  # fmt: skip
    (checkpoint,) = checkpoints(tmp_path / "results")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == epochs * 2  # the 8 training images of demo_root in batches of 4
    assert ("training the paper's 50 epochs" in caplog.text) == (not options)
    assert "Training batch size is 4" not in caplog.text  # the paper's batch size: no note
