"""The plain functions that leave the teacher out of a checkpoint and put it back (no model, no training)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from anomalib_transformer_student.training import teacher_checkpoint, teacher_weights
from anomalib_transformer_student.training.teacher_checkpoint import (
    TEACHER_KEY,
    TeacherNotInCheckpointError,
    TeacherSource,
    is_final_checkpoint,
    omit_teacher,
    restore_teacher,
    teacher_source,
)
from anomalib_transformer_student.training.weights_digest import DigestMemo, state_digest

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
    monkeypatch.setattr(teacher_weights, "is_cached", lambda name: False)
    assert teacher_source(TEACHER, pretrained=True, weights=None) is None
    monkeypatch.setattr(teacher_weights, "is_cached", lambda name: True)
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


def test_the_digest_is_computed_once_per_unchanged_teacher() -> None:
    checkpoint, teacher = _checkpoint()
    memo = DigestMemo()
    for _ in range(3):
        omit_teacher({"state_dict": dict(checkpoint["state_dict"])}, TeacherSource(TEACHER, None), memo=memo)
    assert memo.hashed == 1
    teacher["pos_embed"].add_(1)  # an in-place change (as load_state_dict makes) is seen
    changed = {"state_dict": {f"model.teacher.backbone.{key}": value for key, value in teacher.items()}}
    omit_teacher(changed, TeacherSource(TEACHER, None), memo=memo)
    assert memo.hashed == 2
    assert changed[TEACHER_KEY]["digest"] == state_digest(_prefixed(teacher))


def _prefixed(teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.teacher.backbone.{key}": value for key, value in teacher.items()}


def _never(source: TeacherSource) -> dict[str, torch.Tensor]:
    raise AssertionError(f"nothing may be fetched or built for {source}")


@pytest.mark.parametrize("recorded", ["vit_giant_patch14_dinov2.lvd142m", "vit_small_patch16_224.augreg_in21k"])
def test_a_recorded_teacher_other_than_the_models_is_refused_before_any_fetch(recorded: str) -> None:
    checkpoint, _ = _checkpoint()
    omit_teacher(checkpoint, TeacherSource(recorded, None))

    with pytest.raises(TeacherNotInCheckpointError, match="not this model's teacher") as caught:
        restore_teacher(checkpoint, _never, teacher=TEACHER)
    assert recorded in str(caught.value)
    assert "nothing was fetched" in str(caught.value)


def test_the_same_teacher_is_fetched_under_the_models_name() -> None:
    checkpoint, teacher = _checkpoint()
    omit_teacher(checkpoint, TeacherSource("vit_small_patch14_dinov2", None))  # timm's default tag: lvd142m
    asked: list[TeacherSource] = []
    restore_teacher(checkpoint, lambda source: asked.append(source) or teacher, teacher=TEACHER)
    assert asked == [TeacherSource(TEACHER, None)]
    assert TEACHER_KEY not in checkpoint


def test_another_pretrained_tag_is_refused_unless_the_weights_come_from_a_file() -> None:
    other_tag = "vit_base_patch16_224.orig_in21k"
    assert not teacher_checkpoint.same_teacher(other_tag, "vit_base_patch16_224", weights_file=False)
    assert teacher_checkpoint.same_teacher(other_tag, "vit_base_patch16_224", weights_file=True)
    checkpoint, teacher = _checkpoint()
    omit_teacher(checkpoint, TeacherSource("vit_small_patch14_dinov2.other", "/weights.safetensors"))
    restore_teacher(checkpoint, lambda source: teacher, teacher=TEACHER)
    assert TEACHER_KEY not in checkpoint


@pytest.mark.parametrize(
    ("breaker", "problem"),
    [
        (lambda record: "omitted", "it is a str, not a mapping"),
        (lambda record: {key: value for key, value in record.items() if key != "teacher"}, "lacks ['teacher']"),
        (lambda record: {key: value for key, value in record.items() if key != "weights"}, "lacks ['weights']"),
        (lambda record: {**record, "keys": "model.teacher.backbone.w"}, "['keys'] have the wrong type"),
        (lambda record: {**record, "weights": 3}, "['weights'] have the wrong type"),
        (lambda record: {**record, "keys": ["model.forward_student.0.weight"]}, "not all teacher tensors"),
        (lambda record: {**record, "digest": "0" * 10}, "not a SHA-256"),
        (lambda record: {**record, "teacher": ""}, "is empty"),
    ],
    ids=["not-a-mapping", "no-teacher", "no-weights", "keys-type", "weights-type", "foreign-keys", "digest", "empty"],
)
def test_a_malformed_record_raises_a_clear_error_not_a_key_error(breaker, problem: str) -> None:
    checkpoint, _ = _checkpoint()
    omit_teacher(checkpoint, TeacherSource(TEACHER, None))
    checkpoint[TEACHER_KEY] = breaker(checkpoint[TEACHER_KEY])

    with pytest.raises(TeacherNotInCheckpointError, match="is malformed") as caught:
        restore_teacher(checkpoint, _never, teacher=TEACHER)
    assert problem in str(caught.value)
    assert "holds the teacher" in str(caught.value)
