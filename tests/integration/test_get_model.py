"""anomalib's ``get_model`` builds TransformerStudent, groups of options included, from every form anomalib passes.

A name with keyword arguments, a dict and a ``DictConfig`` (the benchmark pipeline), and the jsonargparse
``Namespace`` that anomalib's ``tools/inference/lightning_inference.py`` parses and hands over.
"""

from __future__ import annotations

from typing import Any

import pytest
from anomalib.models import AnomalibModule, get_model
from lightning.pytorch.cli import LightningArgumentParser
from omegaconf import OmegaConf

from anomalib_transformer_student import TransformerStudent

from ..helpers import SMALL_TEACHER

SMALL = {"teacher": SMALL_TEACHER, "pretrained": False, "image_size": 56, "layers": (1, 3)}
GROUPS = {"anomaly_map": {"topk_ratio": 0.01}, "tiling": {"tile_size": 112}, "feature_cache": {"dtype": "float32"}}


def _groups(model: TransformerStudent) -> tuple[float, int | None, str]:
    """The three groups' options the calls set, as the model uses them."""
    tiling = model.tiling
    return (
        model.model.anomaly_map_generator.topk_ratio,
        None if tiling is None else tiling.tile_size,
        model.feature_caching.settings.dtype,
    )


def test_the_inference_tools_namespace_builds_the_model() -> None:
    """The calls of ``lightning_inference.py``: its parser, ``--model`` options, ``get_model(args.model)``."""
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(AnomalibModule, "model", subclass_mode=True)
    args = parser.parse_args(
        ["--model", "TransformerStudent", "--model.pretrained", "false", "--model.teacher", SMALL_TEACHER,
         "--model.image_size", "56", "--model.layers", "[1, 3]", "--model.anomaly_map.topk_ratio", "0.01",
         "--model.tiling.tile_size", "112", "--model.feature_cache.dtype", "float32"]
    )  # fmt: skip
    assert "tiling.tile_size" in args.model.init_args.keys()  # noqa: SIM118 (a Namespace flattens its keys)
    model = get_model(args.model)
    assert type(model) is TransformerStudent
    assert _groups(model) == (0.01, 112, "float32")
    assert model.hparams["tiling"] == {"tile_size": 112, "tile_overlap": 0, "tile_batch_size": 8}
    assert not any("." in key for key in model.hparams)


@pytest.mark.parametrize(
    "config",
    [
        {"class_path": "TransformerStudent", "init_args": {**SMALL, **GROUPS}},
        {"class_path": "anomalib_transformer_student.TransformerStudent", "init_args": {**SMALL, **GROUPS}},
        OmegaConf.create({"class_path": "TransformerStudent", "init_args": {**SMALL, **GROUPS}}),
    ],
    ids=["dict", "dict-full-class-path", "DictConfig"],
)
def test_get_model_with_a_config_builds_the_groups(config: Any) -> None:
    model = get_model(config)
    assert type(model) is TransformerStudent
    assert _groups(model) == (0.01, 112, "float32")
    assert type(model.hparams["anomaly_map"]) is dict


def test_get_model_with_the_name_and_keyword_arguments() -> None:
    model = get_model("TransformerStudent", **SMALL, **GROUPS)
    assert type(model) is TransformerStudent
    assert _groups(model) == (0.01, 112, "float32")
    assert model.model.teacher.grid_size == (4, 4)
