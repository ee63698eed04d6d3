"""Teacher-weight failures reach the anomalib CLI user intact; checkpoints need no teacher source."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from anomalib_transformer_student import TransformerStudent

from ...helpers import checkpoints, data_args, run_cli

pytestmark = pytest.mark.slow
TEACHER_ARGS = ["--model.teacher", "vit_small_patch14_dinov2", "--model.image_size", "112"]
JSONARGPARSE_BURIAL = "Does not validate against any of the Union subtypes"


def test_unreachable_hub_message_reaches_cli_user(demo_root: Path, tmp_path: Path) -> None:
    result = run_cli(
        ["train", "--model", "TransformerStudent", *TEACHER_ARGS, *data_args(demo_root),
         "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path / "results")],
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"},
    )  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "TeacherWeightsUnavailableError: Could not fetch the pretrained weights" in output
    assert "HF_HUB_OFFLINE=1" in output
    assert JSONARGPARSE_BURIAL not in output


def test_missing_weights_file_is_named_by_cli(demo_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "dinov2_vits14_pretrain.pth"
    result = run_cli(
        ["train", "--model", "TransformerStudent", *TEACHER_ARGS, "--model.teacher_weights", str(missing),
         *data_args(demo_root), "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path / "results")],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"Teacher weights file not found: '{missing}'" in output
    assert JSONARGPARSE_BURIAL not in output


def test_checkpoint_needs_no_teacher_source(demo_root: Path, tmp_path: Path) -> None:
    weights = tmp_path / "teacher.pth"
    torch.save(timm.create_model("vit_small_patch14_dinov2", num_classes=0).state_dict(), weights)
    common = ["--model", "TransformerStudent", *TEACHER_ARGS, "--model.teacher_weights", str(weights),
              *data_args(demo_root)]  # fmt: skip
    trained = run_cli(
        ["train", *common, "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path / "train")], cwd=tmp_path
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    (checkpoint,) = checkpoints(tmp_path / "train")
    weights.unlink()  # the source is gone: the checkpoint must carry the teacher

    tested = run_cli(
        ["test", *common, "--ckpt_path", str(checkpoint), "--default_root_dir", str(tmp_path / "test")],
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "pixel_AUROC" in tested.stdout + tested.stderr

    reloaded = TransformerStudent.load_from_checkpoint(checkpoint)
    assert bool(reloaded.model.teacher.weights_loaded)
    reloaded.load_teacher_weights()  # a no-op: nothing to fetch, the missing file is never opened
