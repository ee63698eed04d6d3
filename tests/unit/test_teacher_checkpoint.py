"""The plain functions that leave the teacher out of a checkpoint and put it back (no model, no training)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from anomalib_transformer_student.training import teacher_checkpoint
from anomalib_transformer_student.training.teacher_checkpoint import (
    TEACHER_KEY,
    TeacherNotInCheckpointError,
    TeacherSource,
    is_final_checkpoint,
    omit_teacher,
    restore_teacher,
    teacher_source,
)

TEACHER = "vit_small_patch14_dinov2.lvd142m"


def _checkpoint() -> tuple[dict, dict[str, torch.Tensor]]:
    teacher = {"pos_embed": torch.randn(1, 5, 4), "blocks.0.w": torch.randn(4, 4)}
    state = {f"model.teacher.backbone.{key}": value for key, value in teacher.items()}
    state |= {"model.teacher.weights_loaded": torch.tensor(True), "model.forward_student.0.weight": torch.randn(2)}
    return {"state_dict": state}, teacher


def _trainer(epoch: int, max_epochs: int = 3, **overrides) -> SimpleNamespace:
    values = {
        "state": SimpleNamespace(fn=TrainerFn.FITTING, status=TrainerStatus.RUNNING),
        "should_stop": False,
        "current_epoch": epoch,
        "max_epochs": max_epochs,
        "max_steps": -1,
        "global_step": 10 * epoch,
    }
    return SimpleNamespace(**{**values, **overrides})


def test_only_the_last_save_of_a_running_fit_is_final() -> None:
    assert not is_final_checkpoint(_trainer(0))
    assert not is_final_checkpoint(_trainer(1))
    assert is_final_checkpoint(_trainer(2))
    assert is_final_checkpoint(_trainer(0, should_stop=True))
    assert is_final_checkpoint(_trainer(1, max_steps=10))
    assert not is_final_checkpoint(_trainer(1, max_epochs=-1))
    assert is_final_checkpoint(_trainer(1, state=SimpleNamespace(fn=TrainerFn.FITTING, status=TrainerStatus.FINISHED)))
    assert is_final_checkpoint(_trainer(1, state=SimpleNamespace(fn=TrainerFn.TESTING, status=TrainerStatus.RUNNING)))
    assert is_final_checkpoint(None)


def test_timm_weights_are_a_source_only_when_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(teacher_checkpoint, "is_cached", lambda name: False)
    assert teacher_source(TEACHER, pretrained=True, weights=None) is None
    monkeypatch.setattr(teacher_checkpoint, "is_cached", lambda name: True)
    assert teacher_source(TEACHER, pretrained=True, weights=None) == TeacherSource(TEACHER, None)
    assert teacher_source(TEACHER, pretrained=False, weights=None) is None


def test_round_trip_with_timm_weights_and_a_clear_failure_offline() -> None:
    checkpoint, teacher = _checkpoint()
    omit_teacher(checkpoint, TeacherSource(TEACHER, None))
    assert sorted(checkpoint["state_dict"]) == ["model.forward_student.0.weight", "model.teacher.weights_loaded"]

    def offline(source: TeacherSource) -> dict[str, torch.Tensor]:
        raise RuntimeError("HF_HUB_OFFLINE is set and they are not in the local cache")

    with pytest.raises(TeacherNotInCheckpointError, match=f"'{TEACHER}'.*Hugging Face") as caught:
        restore_teacher(checkpoint, offline)
    assert "HF_HUB_OFFLINE" in str(caught.value)
    with pytest.raises(TeacherNotInCheckpointError, match="differ"):
        restore_teacher(checkpoint, lambda source: {key: value + 1 for key, value in teacher.items()})

    restore_teacher(checkpoint, lambda source: {key: value.clone() for key, value in teacher.items()})
    assert TEACHER_KEY not in checkpoint
    for key, value in teacher.items():
        assert torch.equal(checkpoint["state_dict"][f"model.teacher.backbone.{key}"], value)


def test_the_models_own_weights_file_replaces_the_recorded_one() -> None:
    checkpoint, teacher = _checkpoint()
    omit_teacher(checkpoint, TeacherSource(TEACHER, "/old/place.safetensors"))
    asked: list[TeacherSource] = []
    restore_teacher(checkpoint, lambda source: asked.append(source) or teacher, weights="/new/place.safetensors")
    assert asked == [TeacherSource(TEACHER, "/new/place.safetensors")]


def test_checkpoints_with_the_teacher_are_left_alone() -> None:
    checkpoint, _ = _checkpoint()
    before = dict(checkpoint["state_dict"])
    restore_teacher(checkpoint, lambda source: pytest.fail("nothing to fetch"))
    assert checkpoint["state_dict"] == before


def test_the_digest_is_computed_once_per_unchanged_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint, teacher = _checkpoint()
    calls: list[int] = []
    digest = teacher_checkpoint.state_digest
    monkeypatch.setattr(teacher_checkpoint, "state_digest", lambda state: calls.append(1) or digest(state))
    memo: dict = {}
    for _ in range(3):
        omit_teacher({"state_dict": dict(checkpoint["state_dict"])}, TeacherSource(TEACHER, None), memo=memo)
    assert len(calls) == 1
    teacher["pos_embed"].add_(1)  # an in-place change (as load_state_dict makes) is seen
    changed = {"state_dict": {f"model.teacher.backbone.{key}": value for key, value in teacher.items()}}
    omit_teacher(changed, TeacherSource(TEACHER, None), memo=memo)
    assert len(calls) == 2
    assert changed[TEACHER_KEY]["digest"] == digest(_prefixed(teacher))


def _prefixed(teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.teacher.backbone.{key}": value for key, value in teacher.items()}
