"""`SizeEvaluator`, the one evaluator of the demo, `transformer-student evaluate` and configs/size_aupro.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from jsonargparse import ArgumentParser

from anomalib_transformer_student.apps.cli import main
from anomalib_transformer_student.apps.demo import METRIC_COLUMNS, DemoSettings, build_model, resolve_teacher
from anomalib_transformer_student.metrics import SizeAUPRO, SizeEvaluator
from anomalib_transformer_student.model import TransformerStudent

from ...helpers import SMALL_TEACHER

CONFIG = Path(__file__).parents[3] / "configs" / "size_aupro.yaml"


def described(evaluator: Evaluator) -> list[tuple[str, type, bool]]:
    return [(metric.name, type(metric), metric.strict) for metric in evaluator.test_metrics]


def evaluator_from_yaml(node: dict[str, Any]) -> Evaluator:
    """Instantiate an `evaluator:` node as anomalib's CLI does: jsonargparse, against the type `Evaluator`."""
    parser = ArgumentParser()
    parser.add_argument("--evaluator", type=Evaluator)
    return parser.instantiate_classes(parser.parse_object({"evaluator": node})).evaluator


def test_default_metrics() -> None:
    evaluator = SizeEvaluator()
    assert described(evaluator) == [
        ("image_AUROC", AUROC, True),
        ("pixel_AUROC", AUROC, True),
        ("pixel_AUPRO", AUPRO, True),
        ("pixel_SizeAUPRO", SizeAUPRO, True),
    ]
    size_aupro = evaluator.size_aupro()
    assert (size_aupro.summary, size_aupro.curve) == ("robustness", "exact")
    assert float(evaluator.test_metrics[2].fpr_limit) == pytest.approx(0.3)
    assert len(evaluator.val_metrics) == 0


def test_options_reach_the_metrics() -> None:
    evaluator = SizeEvaluator(summaries={"pixel_q4_": "Q4_fpr0.01"}, curve="authors", include_f1=True, strict=False)
    assert described(evaluator) == [
        ("image_AUROC", AUROC, True),
        ("image_F1Score", F1Score, True),
        ("pixel_AUROC", AUROC, False),
        ("pixel_AUPRO", AUPRO, False),
        ("pixel_F1Score", F1Score, False),
        ("pixel_q4_SizeAUPRO", SizeAUPRO, False),
    ]
    size_aupro = evaluator.size_aupro()
    assert (size_aupro.summary, size_aupro.curve) == ("Q4_fpr0.01", "authors")
    assert SizeEvaluator(summaries={}).size_aupro() is None
    with pytest.raises(ValueError, match="`curve` must be one of"):
        SizeEvaluator(curve="sampled")


def test_size_aupro_config_names_the_size_evaluator() -> None:
    node = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["evaluator"]
    assert node["class_path"] == "anomalib_transformer_student.metrics.SizeEvaluator"
    evaluator = evaluator_from_yaml(node)
    assert isinstance(evaluator, SizeEvaluator)
    assert described(evaluator) == [
        ("image_AUROC", AUROC, True),
        ("pixel_AUROC", AUROC, True),
        ("pixel_AUPRO", AUPRO, True),
        ("pixel_SizeAUPRO", SizeAUPRO, True),
        ("pixel_q1_SizeAUPRO", SizeAUPRO, True),
    ]
    assert [(m.summary, m.curve) for m in evaluator.test_metrics[3:]] == [
        ("robustness", "exact"),
        ("Q1_fpr0.30", "exact"),
    ]
    authors = evaluator_from_yaml({**node, "init_args": {**node["init_args"], "curve": "authors"}})
    assert {m.curve for m in authors.test_metrics[3:]} == {"authors"}


def test_demo_model_tests_with_the_size_evaluator() -> None:
    settings = DemoSettings(teacher=SMALL_TEACHER, image_size=112, pretrained=False)
    model = build_model(settings, resolve_teacher(SMALL_TEACHER, use_pretrained=False))
    assert isinstance(model.evaluator, SizeEvaluator)
    assert [name for name, _, _ in described(model.evaluator)] == list(METRIC_COLUMNS)
    assert [strict for _, _, strict in described(model.evaluator)] == [True, True, False, False, False]


class _Loaded(BaseException):
    """Stops `evaluate` right after it loaded the checkpoint (no ``Exception``: nothing on the way may catch it)."""


@pytest.mark.parametrize(("options", "curve"), [([], "exact"), (["--curve", "authors"], "authors")])
def test_evaluate_loads_checkpoints_with_the_size_evaluator(
    options: list[str], curve: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def load_from_checkpoint(path: Path, **overrides: Any) -> TransformerStudent:
        calls.append((path, overrides))
        raise _Loaded

    monkeypatch.setattr(TransformerStudent, "load_from_checkpoint", load_from_checkpoint)
    checkpoint = tmp_path / "brick.ckpt"
    checkpoint.touch()
    (tmp_path / "brick").mkdir()  # evaluate checks the category's folder before it loads anything
    with pytest.raises(_Loaded):
        main(["evaluate", "--data-root", str(tmp_path), "--ckpt", f"brick={checkpoint}", *options])
    ((path, overrides),) = calls
    assert path == checkpoint
    assert overrides["feature_cache"] is False  # a single test writes no cache outside --output
    evaluator = overrides["evaluator"]
    assert isinstance(evaluator, SizeEvaluator)
    assert [name for name, _, _ in described(evaluator)] == [
        "image_AUROC",
        "pixel_AUROC",
        "pixel_AUPRO",
        "pixel_SizeAUPRO",
    ]
    assert evaluator.size_aupro().curve == curve
