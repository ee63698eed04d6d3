"""The module's callbacks (RNG state, paper schedule, data checks) and its checkpoint and NaN-guard mixins."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from anomalib_transformer_student.training.data_checks import DataChecks
from anomalib_transformer_student.training.rng_state import RandomGeneratorState
from anomalib_transformer_student.training.schedule import PaperSchedule

from ...factories import small_model

SMALL = {"layers": (1, 3)}  # with small_model's random teacher at 56 px


def _draws() -> tuple:
    return random.random(), torch.rand(2).tolist()


def test_rng_state_is_restored_when_a_fit_resumes_only() -> None:
    callback = RandomGeneratorState()
    state = callback.state_dict()
    expected = _draws()

    callback.setup(None, None, stage="test")
    callback.load_state_dict(state)
    assert _draws() != expected  # testing from a checkpoint leaves the generators alone

    callback.setup(None, None, stage="fit")
    callback.load_state_dict(state)
    assert _draws() == expected


def test_the_module_brings_its_callbacks_and_adopts_a_trainers_skip_setting() -> None:
    model = small_model(**SMALL)
    model._trainer = SimpleNamespace(callbacks=[DataChecks(skip_corrupt_images=True), RandomGeneratorState()])
    callbacks = model.configure_callbacks()
    kinds = [type(callback) for callback in callbacks]
    assert {DataChecks, PaperSchedule, RandomGeneratorState} <= set(kinds)
    (checks,) = [callback for callback in callbacks if isinstance(callback, DataChecks)]
    assert checks.skip_corrupt_images
    assert checks.input_size == 56


def test_checkpoint_hooks_record_the_architecture_and_keep_a_random_teacher() -> None:
    model = small_model(**SMALL)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["transformer_student_architecture"] == {
        "teacher": "vit_small_patch14_dinov2",
        "layers": [1, 3],
        "image_size": 56,
    }
    assert any(key.startswith("model.teacher.backbone.") for key in checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)  # its own checkpoint is compatible
