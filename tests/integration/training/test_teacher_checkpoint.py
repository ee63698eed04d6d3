"""Checkpoints written before the last epoch leave out a teacher that has a weights source, and load from it.

A 3-epoch fit with a teacher from a local weights file writes one checkpoint per epoch: those of epochs
0 and 1 lack the teacher (and are much smaller), that of epoch 2 holds it and loads with the file deleted.
A teacherless checkpoint loads when the file is there (weights verified by digest), and fails with a
message naming the teacher, the file and the ways out when it is not. Resuming from a teacherless
``last.ckpt`` ends with the same students as an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from anomalib.callbacks.checkpoint import ModelCheckpoint
from lightning.pytorch import seed_everything
from safetensors.torch import save_file

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.training import teacher_weights
from anomalib_transformer_student.training.teacher_checkpoint import (
    TEACHER_KEY,
    TEACHER_PREFIX,
    TeacherNotInCheckpointError,
    TeacherSource,
    omit_teacher,
)

from ...factories import Interrupted, callbacks_with_interrupt, make_datamodule, make_engine, small_model
from ...helpers import SMALL_TEACHER

SEED = 11
EPOCHS = 3


@pytest.fixture(scope="module")
def teacher_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(SMALL_TEACHER, pretrained=False, num_classes=0).state_dict()


def _weights_file(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def _model(weights: Path, workdir: Path) -> TransformerStudent:
    return small_model(
        pretrained=True, teacher_weights=str(weights), layers=(0, 1), feature_cache={"dir": str(workdir / "cache")}
    )


def _fit(
    root: Path, weights: Path, workdir: Path, interrupt_at: int | None = None, ckpt_path: Path | None = None
) -> TransformerStudent:
    seed_everything(SEED)
    datamodule = make_datamodule(root)
    model = _model(weights, workdir)
    checkpoint = ModelCheckpoint(
        dirpath=workdir / "checkpoints",
        filename="epoch{epoch}",
        auto_insert_metric_name=False,
        save_top_k=-1,
        every_n_epochs=1,
        save_last=True,
    )
    engine = make_engine(workdir, max_epochs=EPOCHS, callbacks=callbacks_with_interrupt([checkpoint], interrupt_at))
    engine.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _students(model: TransformerStudent) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("forward_student", "backward_student")
        for key, value in getattr(model.model, name).state_dict().items()
    }


def _teacher(model: TransformerStudent) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.model.teacher.backbone.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(
    demo_root: Path, tmp_path_factory: pytest.TempPathFactory, teacher_state: dict[str, torch.Tensor]
) -> tuple[TransformerStudent, Path, Path]:
    """One uninterrupted seeded fit from a teacher weights file: the model, the file and the run's folder.

    Read by both tests below; the first then overwrites and deletes the weights file, which the second never uses.
    """
    root = tmp_path_factory.mktemp("uninterrupted")
    weights = _weights_file(root / "teacher.safetensors", teacher_state)
    return _fit(demo_root, weights, root / "run"), weights, root / "run"


@pytest.mark.slow
def test_teacher_left_out_before_the_last_epoch_and_reloaded(
    uninterrupted: tuple[TransformerStudent, Path, Path], teacher_state: dict[str, torch.Tensor]
) -> None:
    trained, weights, run = uninterrupted
    directory = run / "checkpoints"
    intermediate, final = directory / "epoch1.ckpt", directory / "epoch2.ckpt"

    for path in (directory / "epoch0.ckpt", intermediate):
        checkpoint = _load(path)
        assert not any(key.startswith(TEACHER_PREFIX) for key in checkpoint["state_dict"]), path
        assert checkpoint[TEACHER_KEY]["weights"] == str(weights)
        assert "model.teacher.weights_loaded" in checkpoint["state_dict"]
    for path in (final, directory / "last.ckpt"):
        checkpoint = _load(path)
        assert TEACHER_KEY not in checkpoint, path
        assert any(key.startswith(TEACHER_PREFIX) for key in checkpoint["state_dict"]), path
    assert intermediate.stat().st_size < 0.6 * final.stat().st_size

    # A teacherless checkpoint loads while the file is there: teacher fetched again, verified, equal.
    reloaded = TransformerStudent.load_from_checkpoint(intermediate)
    expected_teacher = _teacher(trained)
    for key, value in _teacher(reloaded).items():
        assert torch.equal(value, expected_teacher[key]), key
    saved_students = _load(intermediate)["state_dict"]
    for key, value in _students(reloaded).items():
        assert torch.equal(value, saved_students[f"model.{key}"]), key

    # Other weights at the same place are refused (digest).
    other = {key: value + 1 for key, value in teacher_state.items()}
    _weights_file(weights, other)
    with pytest.raises(TeacherNotInCheckpointError, match="differ"):
        TransformerStudent.load_from_checkpoint(intermediate)

    # Without the file: the final checkpoint loads (and needs no fetch); the teacherless one says what to do.
    weights.unlink()
    offline = TransformerStudent.load_from_checkpoint(final)
    offline.load_teacher_weights()  # fetches nothing: the checkpoint held the teacher
    for key, value in _teacher(offline).items():
        assert torch.equal(value, expected_teacher[key]), key
    with pytest.raises(TeacherNotInCheckpointError) as caught:
        TransformerStudent.load_from_checkpoint(intermediate)
    message = str(caught.value)
    assert SMALL_TEACHER in message
    assert str(weights) in message
    assert "teacher_weights" in message
    assert "holds the teacher" in message


@pytest.mark.slow
def test_resume_from_a_teacherless_checkpoint_equals_an_uninterrupted_run(
    demo_root: Path,
    tmp_path: Path,
    teacher_state: dict[str, torch.Tensor],
    uninterrupted: tuple[TransformerStudent, Path, Path],
) -> None:
    weights = _weights_file(tmp_path / "teacher.safetensors", teacher_state)  # the same weights in a file of its own
    reference, _, _ = uninterrupted

    workdir = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        _fit(demo_root, weights, workdir, interrupt_at=1)
    last = workdir / "checkpoints" / "last.ckpt"
    assert TEACHER_KEY in _load(last)
    resumed = _fit(demo_root, weights, workdir, ckpt_path=last)

    assert resumed.trainer.global_step == reference.trainer.global_step > 0
    expected, actual = _students(reference), _students(resumed)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, msg=lambda text, name=name: f"{name}: {text}")


def _teacherless(model: TransformerStudent, source: TeacherSource) -> dict:
    """A checkpoint of ``model`` written without its teacher, as a save before the last epoch writes it."""
    checkpoint = {"state_dict": dict(model.state_dict())}
    omit_teacher(checkpoint, source)
    return checkpoint


def test_weights_that_fail_the_digest_never_reach_the_live_teacher(
    tmp_path: Path, teacher_state: dict[str, torch.Tensor]
) -> None:
    weights = _weights_file(tmp_path / "teacher.safetensors", teacher_state)
    model = _model(weights, tmp_path)
    model.load_teacher_weights()
    checkpoint = _teacherless(model, TeacherSource(SMALL_TEACHER, str(weights)))
    _weights_file(weights, {key: value + 1 for key, value in teacher_state.items()})  # other weights, same place
    before = _teacher(model)

    with pytest.raises(TeacherNotInCheckpointError, match="differ"):
        model.on_load_checkpoint(checkpoint)

    for key, value in _teacher(model).items():
        assert torch.equal(value, before[key]), key  # the model keeps its own weights


def test_verified_weights_reach_the_teacher_only_through_the_state_dict(
    tmp_path: Path, teacher_state: dict[str, torch.Tensor]
) -> None:
    weights = _weights_file(tmp_path / "teacher.safetensors", teacher_state)
    model = _model(weights, tmp_path)
    model.load_teacher_weights()
    expected = _teacher(model)
    checkpoint = _teacherless(model, TeacherSource(SMALL_TEACHER, str(weights)))
    for parameter in model.model.teacher.backbone.parameters():
        parameter.data.zero_()

    model.on_load_checkpoint(checkpoint)

    assert all(not value.any() for value in _teacher(model).values())  # untouched until the strict load
    for key, value in expected.items():
        assert torch.equal(checkpoint["state_dict"][TEACHER_PREFIX + key], value), key
    model.load_state_dict(checkpoint["state_dict"])
    for key, value in _teacher(model).items():
        assert torch.equal(value, expected[key]), key


def test_a_checkpoint_naming_another_teacher_makes_the_model_fetch_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never_fetch(name: str, weights: str | None) -> dict[str, torch.Tensor]:
        raise AssertionError(f"fetched or built '{name}' for a foreign checkpoint")

    model = small_model(pretrained=True, layers=(0, 1))
    checkpoint = _teacherless(model, TeacherSource("vit_giant_patch14_reg4_dinov2.lvd142m", None))
    monkeypatch.setattr(teacher_weights, "teacher_state_dict", never_fetch)

    with pytest.raises(TeacherNotInCheckpointError, match=f"not this model's teacher '{SMALL_TEACHER}'"):
        model.on_load_checkpoint(checkpoint)
