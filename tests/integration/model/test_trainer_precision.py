"""The trainer's precision reaches teacher and students in every stage; a CPU without bf16 units runs float32."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from anomalib_transformer_student.model import precision

from ...factories import make_datamodule, make_engine, small_model


class StageDtypes:
    """Records, per Lightning stage, the dtypes out of the teacher's first MLP layer and the students' first layers."""

    def __init__(self, model) -> None:
        self.model = model
        self.seen: dict[tuple[str, str], set[torch.dtype]] = {}
        network = model.model
        network.teacher.backbone.blocks[0].mlp.fc1.register_forward_hook(self._hook("teacher"))
        for student in (network.forward_student, network.backward_student):
            student.layers[0].register_forward_hook(self._hook("students"))

    def _hook(self, part: str):
        def record(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
            stage = str(self.model.trainer.state.stage.value)
            self.seen.setdefault((stage, part), set()).add(output.dtype)

        return record

    def dtypes(self, stages: tuple[str, ...]) -> dict[tuple[str, str], set[torch.dtype]]:
        return {key: value for key, value in self.seen.items() if key[0] in stages}


def _fit_test_predict(demo_root: Path, tmp_path: Path, trainer_precision: str):
    torch.manual_seed(0)
    model = small_model()
    dtypes = StageDtypes(model)
    engine = make_engine(tmp_path, max_epochs=2, precision=trainer_precision)
    datamodule = make_datamodule(demo_root)
    engine.fit(model, datamodule=datamodule)
    engine.test(model, datamodule=datamodule)
    predictions = engine.predict(model, datamodule=datamodule)
    return dtypes, predictions


def test_bf16_mixed_runs_teacher_and_students_in_bf16_in_every_stage(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)  # whatever this CPU: the maths is the same
    dtypes, predictions = _fit_test_predict(demo_root, tmp_path, "bf16-mixed")
    stages = ("train", "validate", "test", "predict")
    assert {stage for stage, _ in dtypes.seen} == set(stages)
    assert all(seen == {torch.bfloat16} for seen in dtypes.seen.values()), dtypes.seen
    batch = predictions[0]
    assert batch.anomaly_map.dtype == batch.pred_score.dtype == torch.float32
    assert bool(torch.isfinite(batch.anomaly_map).all())


def test_bf16_mixed_on_a_cpu_without_bf16_units_runs_float32_with_one_warning(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    with caplog.at_level(logging.WARNING):
        dtypes, _ = _fit_test_predict(demo_root, tmp_path, "bf16-mixed")
    assert all(seen == {torch.float32} for seen in dtypes.seen.values()), dtypes.seen
    warnings = [record.getMessage() for record in caplog.records if "no bf16 units" in record.getMessage()]
    assert len(warnings) == 1
    assert "runs in float32" in warnings[0] and "32-true" in warnings[0]
