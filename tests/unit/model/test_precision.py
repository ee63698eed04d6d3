"""Precision: the CPU's bf16 units, and the model under the trainer's autocast (float32 tokens, loss and map)."""

from __future__ import annotations

import pytest
import torch

from anomalib_transformer_student.model import precision
from anomalib_transformer_student.model.teacher import TeacherFeatureExtractor, create_backbone
from anomalib_transformer_student.model.torch_model import TransformerStudentModel


def model(image_size: int = 56) -> TransformerStudentModel:
    torch.manual_seed(0)
    teacher = TeacherFeatureExtractor(create_backbone("vit_small_patch14_dinov2"), (7, 11), image_size)
    return TransformerStudentModel(teacher)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


class OutputDtypes:
    """Records the dtype of each output of the teacher's first MLP layer and of both students' first layers."""

    def __init__(self, network: TransformerStudentModel) -> None:
        self.seen: dict[str, set[torch.dtype]] = {"teacher": set(), "students": set()}
        network.teacher.backbone.blocks[0].mlp.fc1.register_forward_hook(self._hook("teacher"))
        for student in (network.forward_student, network.backward_student):
            next(module for module in student.modules() if isinstance(module, torch.nn.Linear)).register_forward_hook(
                self._hook("students")
            )

    def _hook(self, part: str):
        def record(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self.seen[part].add(output.dtype)

        return record


def test_cpu_bf16_units_are_read_from_the_cpu_features(monkeypatch: pytest.MonkeyPatch) -> None:
    for features, expected in [
        ({"avx2", "avx512f", "avx512_vnni"}, False),  # AVX-512 without BF16 (e.g. Ice Lake)
        ({"avx2", "avx512f", "avx512_bf16"}, True),  # AMD Zen 4, Intel Cooper Lake
        ({"avx2", "amx_bf16", "amx_tile"}, True),  # Intel Sapphire Rapids
        ({"asimd", "bf16"}, True),  # Arm Neoverse V1
    ]:
        monkeypatch.setattr(precision, "cpu_features", lambda features=features: frozenset(features))
        assert precision.cpu_has_bf16_units() is expected
        assert precision.emulates_bf16("bf16-mixed", torch.device("cpu")) is not expected
        assert precision.emulates_bf16("32-true", torch.device("cpu")) is False


def test_under_bf16_autocast_teacher_and_students_run_bf16_and_the_map_stays_float32() -> None:
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    network = model().eval()
    with torch.no_grad():
        expected = network(images)
        expected_tokens = network.teacher_features(images)
        dtypes = OutputDtypes(network)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = network.teacher_features(images)
            actual = network(images)
    assert dtypes.seen == {"teacher": {torch.bfloat16}, "students": {torch.bfloat16}}
    for token, expected_token in zip(tokens, expected_tokens, strict=True):
        assert token.dtype == torch.float32
        error = float((token - expected_token).abs().max() / expected_token.abs().max())
        # bf16 keeps 8 significant bits (relative step 2**-8 = 0.4 %): the error is that size, not float32's 1e-7.
        assert 1e-4 < error < 5e-2
    assert actual.anomaly_map.dtype == actual.pred_score.dtype == torch.float32
    assert pearson(actual.anomaly_map, expected.anomaly_map) >= 0.99


def test_the_loss_is_float32_under_bf16_autocast_and_its_gradient_reaches_the_students() -> None:
    network = model().train()
    shallow, deep = torch.randn(2, 16, 384), torch.randn(2, 16, 384)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = network.student_loss(shallow, deep)
    assert loss.dtype == torch.float32
    loss.backward()
    gradients = [p.grad for p in network.forward_student.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and bool(g.abs().sum() > 0) for g in gradients)
    reference = model().train().student_loss(shallow, deep)
    assert abs(float(loss.detach()) - float(reference.detach())) < 2e-2  # bf16 students, float32 cosine maths


def test_exported_graph_holds_float32_only() -> None:
    program = torch.export.export(model().eval(), (torch.rand(1, 3, 56, 56),))
    dtypes = {
        node.meta["val"].dtype
        for node in program.graph.nodes
        if isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].is_floating_point()
    }
    assert dtypes == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half-precision autocast on CUDA needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_maps_correlate_with_float32_on_cuda(dtype: torch.dtype) -> None:
    images = torch.rand(4, 3, 448, 448, generator=torch.Generator().manual_seed(1)).cuda()
    network = model(448).cuda().eval()
    with torch.no_grad():
        reference = network(images)
        with torch.autocast("cuda", dtype=dtype):
            shallow, _ = network.teacher_features(images)
            output = network(images)
    assert shallow.dtype == output.anomaly_map.dtype == torch.float32
    assert pearson(output.anomaly_map, reference.anomaly_map) >= 0.999
