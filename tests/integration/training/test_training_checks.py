"""Training stops at the first batch when the teacher's features are not finite."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from anomalib_transformer_student.model.teacher import create_backbone
from anomalib_transformer_student.training.finite_features import NonFiniteFeaturesError

from ...factories import make_datamodule, make_engine, small_model
from ...helpers import SMALL_TEACHER


def test_broken_weights_file_stops_training_at_the_first_batch(demo_root: Path, tmp_path: Path) -> None:
    """A weights file with a NaN (a bad download) fails at the first batch, naming the file and the tensor."""
    state = create_backbone(SMALL_TEACHER).state_dict()
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    weights = tmp_path / "teacher.safetensors"
    save_file(state, weights)
    model = small_model(pretrained=True, teacher_weights=str(weights), layers=(1, 3), feature_cache=False)
    datamodule = make_datamodule(demo_root)
    engine = make_engine(tmp_path / "results", max_epochs=3)
    with pytest.raises(NonFiniteFeaturesError) as error:
        engine.fit(model, datamodule=datamodule)
    message = str(error.value)
    assert re.search(r"shallow layer: \d+ NaN", message)
    assert "blocks.1.mlp.fc1.weight" in message
    assert str(weights) in message
    assert engine.trainer.global_step == 0  # stopped before the first optimiser step
    assert all(torch.isfinite(parameter).all() for parameter in model.model.forward_student.parameters())
