"""A checkpoint loaded into a model of another teacher, other layers or another size fails, naming the setting."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch
from anomalib.metrics import AUPRO, Evaluator

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.training.checkpoint_compat import (
    ARCHITECTURE_KEY,
    CheckpointMismatchError,
    check_checkpoint_compatible,
)

from ...helpers import SMALL_TEACHER

DEPTH = 12


def _architecture(teacher: str = SMALL_TEACHER, layers: tuple[int, int] = (7, 11), image_size: int = 224) -> dict:
    """A model's architecture as the check receives it (of a 12-block teacher)."""
    return {"teacher": teacher, "layers": [index % DEPTH for index in layers], "image_size": image_size}


RECORDED = {ARCHITECTURE_KEY: {"teacher": SMALL_TEACHER, "layers": [7, 11], "image_size": 224}}


@pytest.mark.parametrize(
    "checkpoint",
    [
        RECORDED,
        {ARCHITECTURE_KEY: {"teacher": f"{SMALL_TEACHER}.lvd142m", "layers": (7, -1), "image_size": 224}},
        {ARCHITECTURE_KEY: {"teacher": SMALL_TEACHER}},  # settings it lacks are not compared
        {"state_dict": {}, "hyper_parameters": {"teacher": "vit_base_patch14_dinov2", "image_size": 448}},
    ],
    ids=["recorded", "tag-and-negative-index", "partial-record", "no-record"],
)
def test_same_architecture_passes(checkpoint: dict) -> None:
    check_checkpoint_compatible(checkpoint, _architecture(), DEPTH)


def test_every_differing_setting_is_named_with_both_values_and_the_fix() -> None:
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_compatible(RECORDED, _architecture("vit_base_patch14_dinov2", (3, 9), 448), DEPTH)
    message = str(error.value)
    assert f"teacher: checkpoint '{SMALL_TEACHER}', model 'vit_base_patch14_dinov2'" in message
    assert "layers: checkpoint [7, 11], model [3, 9]" in message
    assert "image_size: checkpoint 224, model 448" in message
    assert f"pass teacher='{SMALL_TEACHER}', layers=[7, 11], image_size=224" in message
    assert f'--model.teacher {SMALL_TEACHER} --model.layers "[7, 11]" --model.image_size 224' in message


def test_the_record_wins_over_hyper_parameters() -> None:
    """Lightning writes `load_from_checkpoint` overrides into `hyper_parameters`; the record keeps the truth."""
    checkpoint = {**RECORDED, "hyper_parameters": {"teacher": SMALL_TEACHER, "layers": (3, 9), "image_size": 224}}
    with pytest.raises(CheckpointMismatchError, match=r"layers: checkpoint \[7, 11\], model \[3, 9\]"):
        check_checkpoint_compatible(checkpoint, _architecture(layers=(3, 9)), DEPTH)


def test_layers_out_of_the_teachers_range_count_as_different() -> None:
    checkpoint = {ARCHITECTURE_KEY: {"teacher": SMALL_TEACHER, "layers": (7, 40), "image_size": 224}}
    with pytest.raises(CheckpointMismatchError, match="layers"):
        check_checkpoint_compatible(checkpoint, _architecture(), DEPTH)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as Lightning writes it, of ViT-S/16 at 32 px with layers (1, 3): four blocks, a 2 x 2 grid."""
    model = TransformerStudent(
        teacher="vit_small_patch16_224", pretrained=False, image_size=32, layers=(1, 3), feature_cache=False
    )
    saved = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(saved)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save(saved, path)
    return path


def test_load_from_checkpoint_with_its_own_settings_works(checkpoint: Path) -> None:
    model = TransformerStudent.load_from_checkpoint(checkpoint)
    assert model.model.teacher.layers == (1, 3)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        # Same tensor shapes: without the check these would load silently and compute nonsense.
        ({"layers": (2, 3)}, "layers: checkpoint [1, 3], model [2, 3]"),
        ({"teacher": "vit_small_patch16_384"},
         "teacher: checkpoint 'vit_small_patch16_224', model 'vit_small_patch16_384'"),
        # Other shapes: without the check, a list of mismatched tensor names.
        ({"layers": (1, 2)}, "layers: checkpoint [1, 3], model [1, 2]"),
        ({"image_size": 48}, "image_size: checkpoint 32, model 48"),
    ],
    ids=["layers-same-shapes", "teacher-same-shapes", "layers", "image_size"],
)  # fmt: skip
def test_load_from_checkpoint_with_other_settings_names_them(checkpoint: Path, overrides: dict, fragment: str) -> None:
    with pytest.raises(CheckpointMismatchError) as error:
        TransformerStudent.load_from_checkpoint(checkpoint, **overrides)
    assert fragment in str(error.value)


def test_checkpoint_is_tested_with_the_models_own_metrics(checkpoint: Path) -> None:
    """The checkpoint was saved with anomalib's default metrics; AUPRO brings a buffer the checkpoint lacks."""
    evaluator = Evaluator(test_metrics=[AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.05)])
    model = TransformerStudent.load_from_checkpoint(checkpoint, evaluator=evaluator)
    (aupro,) = model.evaluator.test_metrics
    assert float(aupro.fpr_limit) == pytest.approx(0.05)
    assert not any(type(metric).__name__ == "F1Score" for metric in model.evaluator.test_metrics)
